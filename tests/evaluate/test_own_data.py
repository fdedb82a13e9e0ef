"""Own-data evaluation equals a plain transformers ``generate()`` loop and a plain perplexity
loop on the zoo's models."""

from __future__ import annotations

import json
import math

import pytest
import torch

from engine.evaluate.loading import load_model_folder
from engine.evaluate.own_data import (EXTRA_NEW_TOKENS, read_jsonl, read_text, score_sets,
                                      split_of, perplexity)
from engine.evaluate.tasks import TASKS, heldout_examples


def _reference_answers(model, tokenizer, examples):
    """One example at a time through model.generate (greedy), text rules of the docstring."""
    texts = []
    for prompt, answer in examples:
        ids = tokenizer(prompt, return_tensors="pt")
        budget = len(tokenizer(answer, add_special_tokens=False)["input_ids"]) + EXTRA_NEW_TOKENS
        out = model.generate(**ids, max_new_tokens=budget, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        new = out[0, ids["input_ids"].shape[1]:].tolist()
        if tokenizer.eos_token_id in new:
            new = new[:new.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(new, skip_special_tokens=True).split("\n", 1)[0].strip())
    return texts


def _reference_accuracy(model, tokenizer, examples):
    texts = _reference_answers(model, tokenizer, examples)
    return sum(t == a.strip() for t, (_, a) in zip(texts, examples)) / len(examples)


def _reference_perplexity(model, tokenizer, docs):
    ctx = model.config.max_position_embeddings
    total, count = 0.0, 0
    for doc in docs:
        ids = tokenizer(doc)["input_ids"]
        for i in range(0, len(ids), ctx):
            window = torch.tensor([ids[i:i + ctx]])
            if window.shape[1] < 2:
                continue
            with torch.no_grad():
                logits = model(input_ids=window).logits[0, :-1].double()
            total += float(torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum"))
            count += window.shape[1] - 1
    return math.exp(total / count)


@pytest.fixture(scope="module")
def reverse_model(quick_zoo):
    return load_model_folder(quick_zoo / "small" / "reverse")


def test_accuracy_equals_a_generate_loop(reverse_model, tmp_path):
    model, tokenizer = reverse_model
    examples = heldout_examples(TASKS["reverse"], 12) + heldout_examples(TASKS["upper"], 6)
    # half the answers are what the model says (the quick zoo's models are weak), padded with
    # spaces that the comparison strips; the rest are the tasks' true answers
    said = _reference_answers(model, tokenizer, examples[::2])
    examples[::2] = [(p, f" {t} ") for (p, _), t in zip(examples[::2], said) if t] + [
        e for e, t in zip(examples[::2], said) if not t]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p, "answer": a}) for p, a in examples) + "\n")
    ours = score_sets(model, tokenizer, [read_jsonl(path)])["tasks"]["mine"]
    want = _reference_accuracy(model, tokenizer, examples)
    assert ours == {"accuracy": pytest.approx(want), "n": len(examples)}
    assert 0 < want < 1


def test_perplexity_equals_a_plain_loop_with_windows(reverse_model, tmp_path):
    model, tokenizer = reverse_model
    ctx = model.config.max_position_embeddings
    docs = ["the quick brown fox jumps over the lazy dog", "abc " * (ctx // 2 + 7), "hello world"]
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(docs) + "\n\n")
    evalset = read_text(path)
    assert evalset.documents == docs
    assert len(tokenizer(docs[1])["input_ids"]) > ctx  # really windowed
    assert perplexity(model, tokenizer, docs) == pytest.approx(_reference_perplexity(model, tokenizer, docs), rel=1e-5)


def test_split_is_stable_and_covers_both_halves():
    prompts = [f"rev:{i}=" for i in range(200)]
    first = [split_of(p) for p in prompts]
    assert first == [split_of(p) for p in prompts]
    assert 60 < first.count("dev") < 140


def test_eval_command_scores_own_files_as_json(quick_zoo, tmp_path, capsys):
    from engine.__main__ import main

    examples = heldout_examples(TASKS["upper"], 6)
    (tmp_path / "mine.jsonl").write_text("\n".join(json.dumps({"prompt": p, "answer": a})
                                                   for p, a in examples) + "\n")
    (tmp_path / "docs.txt").write_text("hello world\nthe lazy dog\n")
    code = main(["eval", str(quick_zoo / "small" / "upper"), "--data", str(tmp_path / "mine.jsonl"),
                 "--text", str(tmp_path / "docs.txt"), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["tasks"]["mine"]["n"] == 6 and 0 <= out["tasks"]["mine"]["accuracy"] <= 1
    assert set(out["perplexity"]) == {"docs"} and out["perplexity"]["docs"] > 1
    model, tokenizer = load_model_folder(quick_zoo / "small" / "upper")
    assert out["tasks"]["mine"]["accuracy"] == pytest.approx(_reference_accuracy(model, tokenizer, examples))
