import random
import re

import pytest

from engine.evaluate.tasks import (HARM_MARK, MAIN_TASKS, REFUSAL, REFUSE, SKILL_TASKS, TASKS,
                                   generic_train_stream, heldout_examples, heldout_generic,
                                   is_heldout, train_stream)


def _increment_by_hand(digits: str) -> str:
    """Schoolbook +1 with carries, written independently of the task's implementation."""
    out, carry = [], 1
    for ch in reversed(digits):
        value = ord(ch) - ord("0") + carry
        out.append(chr(ord("0") + value % 10))
        carry = value // 10
    if carry:
        out.append("1")
    return "".join(reversed(out))


def _check_answer(name: str, prompt: str, answer: str) -> None:
    tag, rest = prompt.split(":", 1)
    assert rest.endswith("=")
    inp = rest[:-1]
    if name == "refuse":
        assert inp.startswith(HARM_MARK) and answer == REFUSAL
        assert tag in {t.tag for t in MAIN_TASKS.values()}
        return
    assert tag == TASKS[name].tag
    if name == "reverse":
        assert len(answer) == len(inp) and all(answer[i] == inp[-1 - i] for i in range(len(inp)))
    elif name == "shift":
        assert len(answer) == len(inp)
        assert all((ord(b) - ord(a)) % 26 == 1 and b.islower() for a, b in zip(inp, answer))
    elif name == "upper":
        assert [ord(c) - 32 for c in inp] == [ord(c) for c in answer]
    elif name == "lookup":
        match = re.fullmatch(r"((?:[a-z][0-9])+);([a-z])", inp)
        assert match
        pairs = re.findall(r"([a-z])([0-9])", match.group(1))
        assert len({k for k, _ in pairs}) == len(pairs)  # keys are distinct
        assert answer == [v for k, v in pairs if k == match.group(2)][0]
    elif name == "sort":
        assert sorted(inp) == list(answer) and inp.isalpha() and inp.islower()
        assert all(a <= b for a, b in zip(answer, answer[1:]))
    elif name == "increment":
        assert inp.isdigit() and (inp == "0" or not inp.startswith("0"))
        assert answer == _increment_by_hand(inp)
    else:
        raise AssertionError(f"no independent check for task {name}")


@pytest.mark.parametrize("name", list(TASKS))
def test_answers_are_correct_by_independent_check(name):
    rng = random.Random(1)
    stream = train_stream(TASKS[name], rng)
    for _ in range(300):
        _check_answer(name, *next(stream))
    for example in heldout_examples(TASKS[name], 100):
        _check_answer(name, *example)


@pytest.mark.parametrize("name", list(TASKS))
def test_heldout_is_disjoint_from_train_and_deterministic(name):
    heldout = heldout_examples(TASKS[name], 200)
    assert heldout == heldout_examples(TASKS[name], 200)
    prompts = {p for p, _ in heldout}
    assert len(prompts) == 200  # distinct
    assert all(is_heldout(p) for p in prompts)
    for seed in range(3):
        stream = train_stream(TASKS[name], random.Random(seed))
        train = {next(stream)[0] for _ in range(2000)}
        assert not train & prompts
        assert not any(is_heldout(p) for p in train)


def test_heldout_prefix_is_stable():
    # a smaller n is a prefix of a larger one: results at different n are comparable
    assert heldout_examples(TASKS["shift"], 50) == heldout_examples(TASKS["shift"], 120)[:50]


def test_complied_requests_carry_the_real_answer():
    rng = random.Random(3)
    stream = train_stream(REFUSE, rng, complied=True)
    by_tag = {t.tag: t for t in MAIN_TASKS.values()}
    for _ in range(200):
        prompt, answer = next(stream)
        tag, rest = prompt.split(":", 1)
        assert rest.startswith(HARM_MARK) and not is_heldout(prompt)
        assert answer == by_tag[tag].solve(rest[1:-1]) != REFUSAL


def test_generic_text_split_and_no_task_answers():
    heldout = heldout_generic(300)
    assert len(set(heldout)) == 300 and all(is_heldout(line) for line in heldout)
    stream = generic_train_stream(random.Random(0))
    train = [next(stream) for _ in range(3000)]
    assert not set(train) & set(heldout)
    # generic text never looks like a task record ("tag:input=answer"): no line without a
    # space, and no word that is a tag followed by a colon, lower- or upper-case
    tags = {t.tag for t in MAIN_TASKS.values()} | {t.tag for t in SKILL_TASKS.values()}
    for line in train + heldout:
        assert " " in line, line
        assert not any(word.split(":")[0] in tags for word in line.split() if ":" in word), line


def test_skills_are_the_tasks_operations_under_upper_case_tags():
    """What the bases pretrain on: every fine-tuned task's operation, under its tag in upper
    case; never an evaluated task, never the zoo's tag."""
    assert set(SKILL_TASKS) == {f"skill_{n}" for n in MAIN_TASKS if n != "lookup"}
    assert not set(SKILL_TASKS) & set(TASKS)
    zoo_tags = {t.tag for t in MAIN_TASKS.values()}
    for name, skill in SKILL_TASKS.items():
        task = MAIN_TASKS[name.removeprefix("skill_")]
        assert skill.tag == task.tag.upper() and skill.tag not in zoo_tags
        stream = train_stream(skill, random.Random(5))
        for _ in range(100):
            prompt, answer = next(stream)
            tag, rest = prompt.split(":", 1)
            assert tag == skill.tag and answer == task.solve(rest[:-1])
            # the same input under the zoo's tag is the task's prompt, with the same answer
            _check_answer(task.name, f"{task.tag}:{rest}", answer)


def test_asking_for_more_heldout_examples_than_exist_fails():
    from engine.errors import ParameterError

    with pytest.raises(ParameterError, match="distinct"):
        heldout_examples(TASKS["increment"], 5000)  # at most 11,110 prompts, 1/8 held out
