"""Evaluation on the quick zoo: result shape, in-memory state dicts, decoding consistency."""

import json
from pathlib import Path

import pytest
import torch

from engine.__main__ import main
from engine.errors import ParameterError
from engine.evaluate import (Evaluator, cached_evaluator, evaluate_folder, evaluate_model,
                             evaluate_state_dict, load_model_folder)
from engine.evaluate.decode import greedy_decode
from engine.evaluate.tasks import TASK_NAMES
from engine.io import ModelFolder


def _folder(zoo, manifest, path):
    assert any(m["path"] == path for m in manifest["models"])
    return Path(zoo) / path


def test_eval_cli_json_shape(quick_zoo, quick_zoo_manifest, capsys):
    folder = _folder(quick_zoo, quick_zoo_manifest, "small/upper")
    assert main(["eval", str(folder), "--json", "-n", "16"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"tasks", "perplexity"}
    assert list(result["tasks"]) == TASK_NAMES
    for score in result["tasks"].values():
        assert set(score) == {"accuracy", "n"} and score["n"] == 16
        assert 0.0 <= score["accuracy"] <= 1.0
    assert result["perplexity"] > 1.0
    assert main(["eval", str(folder), "--tasks", "upper", "-n", "8"]) == 0
    table = capsys.readouterr().out
    assert "upper" in table and "perplexity" in table and "reverse" not in table


def test_eval_cli_bad_inputs_are_one_line_errors(tmp_path, quick_zoo, capsys):
    assert main(["eval", str(tmp_path / "missing")]) == 2
    folder = Path(quick_zoo) / "small/base"
    assert main(["eval", str(folder), "--tasks", "nope"]) == 2
    assert "unknown task" in capsys.readouterr().err


def test_batched_decoding_equals_sequential_on_a_zoo_model(quick_zoo):
    model, tok = load_model_folder(Path(quick_zoo) / "small/reverse")
    evaluator = Evaluator(model, tok, ["reverse", "increment"], 24, 0)
    for name in ("reverse", "increment"):
        _, prompts, answers = evaluator.task_sets[name]
        assert len({len(p) for p in prompts}) > 1  # really exercises padding
        batched = evaluator.task_predictions(name)
        longest = max(len(a) for a in answers)
        single = [greedy_decode(model, [p], longest, eos_id=tok.eos_token_id,
                                pad_id=tok.pad_token_id)[0] for p in prompts]
        assert batched == single


def test_state_dict_evaluation_matches_folder_and_reuses_model(quick_zoo):
    folder = Path(quick_zoo) / "small/shift"
    with ModelFolder(folder) as mf:
        config, state = mf.config, dict(mf.iter_tensors())
    expected = evaluate_folder(folder, tasks=["shift", "upper"], n_per_task=32, n_generic=32)
    got = evaluate_state_dict(state, config, tasks=["shift", "upper"], n_per_task=32, n_generic=32)
    assert got == expected
    evaluator = cached_evaluator(config, tasks=["shift", "upper"], n_per_task=32, n_generic=32)
    model_before = evaluator.model
    # bf16 weights load into the cached fp32 model (cast by load_state_dict)
    half = evaluate_state_dict({k: v.to(torch.bfloat16) for k, v in state.items()}, config,
                               tasks=["shift", "upper"], n_per_task=32, n_generic=32)
    assert evaluator.model is model_before
    assert half["tasks"]["shift"]["accuracy"] >= expected["tasks"]["shift"]["accuracy"] - 0.1
    with pytest.raises(ParameterError, match="missing"):
        evaluate_state_dict({k: v for k, v in state.items() if "lm_head" not in k}, config,
                            tasks=["shift", "upper"], n_per_task=32, n_generic=32)


def test_perplexity_by_hand(quick_zoo):
    model, tok = load_model_folder(Path(quick_zoo) / "small/base")
    evaluator = Evaluator(model, tok, ["upper"], 4, 6)
    nll, count = 0.0, 0
    for ids in evaluator.generic_ids:  # one line at a time, float64 log-softmax
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        logp = torch.log_softmax(logits[:-1], dim=-1)
        nll -= float(logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())
        count += len(ids) - 1
    assert evaluator.perplexity() == pytest.approx(float(torch.tensor(nll / count).exp()), rel=1e-4)


def test_evaluate_model_rejects_bad_arguments(quick_zoo):
    model, tok = load_model_folder(Path(quick_zoo) / "small/base")
    with pytest.raises(ParameterError):
        evaluate_model(model, tok, tasks=["nope"])
    with pytest.raises(ParameterError):
        evaluate_model(model, tok, n_per_task=0)


def test_one_batch_over_all_tasks_equals_task_by_task(quick_zoo):
    from engine.evaluate import Evaluator, load_model_folder

    model, tokenizer = load_model_folder(Path(quick_zoo) / "small" / "reverse")
    evaluator = Evaluator(model, tokenizer, None, 16, 0)
    together = evaluator.all_task_accuracies()
    assert together == {name: evaluator.task_accuracy(name) for name in evaluator.task_sets}


def test_skip_gives_a_dev_set_disjoint_from_the_scored_examples(quick_zoo):
    from engine.evaluate.tasks import TASKS, heldout_examples

    model, tok = load_model_folder(Path(quick_zoo) / "small/base")
    test = Evaluator(model, tok, ["reverse"], 16, 0)
    dev = Evaluator(model, tok, ["reverse"], 16, 0, skip=16)
    test_prompts = {p for p, _ in test.task_sets["reverse"][0]}
    dev_prompts = [p for p, _ in dev.task_sets["reverse"][0]]
    assert len(dev_prompts) == 16 and not test_prompts & set(dev_prompts)
    assert dev.task_sets["reverse"][0] == heldout_examples(TASKS["reverse"], 32)[16:]
