"""In-memory what-if merges: same tensors and same scores as a merge written to disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.errors import ParameterError
from engine.evaluate import evaluate_folder
from engine.io import ModelFolder
from engine.merge.executor import run_merge
from engine.merge.spec import IgnoredParameterWarning
from engine.merge.whatif import WhatIfSession, get_session, what_if
from engine.recipe import parse_recipe

EVAL = {"n_per_task": 8, "n_generic": 16}


@pytest.fixture(scope="module")
def small(quick_zoo):
    root = Path(quick_zoo) / "small"
    return {name: root / name for name in ("base", "reverse", "upper", "shift")}


@pytest.fixture(scope="module")
def session(small):
    torch.set_num_threads(1)
    return WhatIfSession(small["base"], [small["reverse"], small["upper"]], device="cpu", **EVAL)


def _scores(result):
    return {"tasks": result["tasks"], "perplexity": result["perplexity"]}


def _load(path):
    with ModelFolder(path) as mf:
        return {n: t.clone() for n, t in mf.iter_tensors()}


def test_a_model_merged_with_itself_evaluates_as_the_model(small):
    twice = WhatIfSession(small["base"], [small["reverse"], small["reverse"]], device="cpu", **EVAL)
    merged = twice.merge("linear", [{"weight": 1.0}, {"weight": 3.0}])
    original = _load(small["reverse"])
    for name, tensor in original.items():
        torch.testing.assert_close(merged[name], tensor.float(), rtol=1e-6, atol=1e-7)
    for method, mps, params in (("linear", [{"weight": 1.0}, {"weight": 3.0}], {}),
                                ("ties", [{"weight": 1.0, "density": 1.0}] * 2, {}),
                                ("task_arithmetic", [{"weight": 0.5}] * 2, {})):
        result = twice.evaluate(method, mps, params)
        reference = evaluate_folder(small["reverse"], **EVAL)
        assert result["tasks"] == reference["tasks"], method
        assert result["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-5), method


@pytest.mark.parametrize("method, mps, params", [
    ("ties", [{"weight": 0.7, "density": 0.4}, {"weight": 0.5, "density": 0.6}], {"lambda": 0.9}),
    ("dare_linear", [{"weight": 0.6, "density": 0.5}, {"weight": 0.6, "density": 0.7}], {}),
    ("slerp_like_linear", None, None),
])
def test_what_if_equals_run_merge_written_then_evaluated(session, small, tmp_path, method, mps, params):
    if method == "slerp_like_linear":  # a base-free method: the base is not among the models
        method, mps, params = "linear", [{"weight": 2.0}, {"weight": 1.0}], {}
    recipe = parse_recipe({
        "merge_method": method, "base_model": str(small["base"]), "parameters": params, "seed": 3,
        "models": [{"model": str(small["reverse"]), "parameters": mps[0]},
                   {"model": str(small["upper"]), "parameters": mps[1]}]})
    out = run_merge(recipe, tmp_path / "out", device="cpu").out
    on_disk = _load(out)
    in_memory = session.merge(method, mps, params, seed=3)
    assert set(in_memory) == set(on_disk)
    for name, tensor in on_disk.items():
        assert tensor.dtype == torch.float32  # the zoo is fp32: no rounding at write
        torch.testing.assert_close(in_memory[name], tensor, rtol=0, atol=0)
    assert _scores(session.evaluate(method, mps, params, seed=3)) == _scores(evaluate_folder(out, **EVAL))


def test_fisher_and_regmean_what_if_equal_the_calibrated_run_merge(session, small, tmp_path):
    for method in ("fisher", "regmean"):
        params = {"calibration": {"n": 6, "seed": 1, "batch_size": 4}}
        recipe = parse_recipe({
            "merge_method": method, "parameters": params,
            "models": [{"model": str(small["reverse"]), "parameters": {"weight": 1.0}},
                       {"model": str(small["upper"]), "parameters": {"weight": 2.0}}]})
        on_disk = _load(run_merge(recipe, tmp_path / method, device="cpu").out)
        in_memory = session.merge(method, [{"weight": 1.0}, {"weight": 2.0}], params)
        for name, tensor in on_disk.items():
            torch.testing.assert_close(in_memory[name], tensor, rtol=1e-6, atol=1e-7)
        # the statistics matter: the result is not the plain weighted mean everywhere
        a, b = _load(small["reverse"]), _load(small["upper"])
        name = "model.layers.0.self_attn.q_proj.weight"
        assert not torch.allclose(on_disk[name], (a[name] + 2 * b[name]) / 3, atol=1e-6)


def test_ignored_and_unknown_parameters(session):
    with pytest.warns(IgnoredParameterWarning, match="'int8_mask' ignored"):
        result = session.evaluate("linear", [{"weight": 1.0}, {"weight": 1.0}], {"int8_mask": True})
    assert any("int8_mask" in w for w in result["warnings"])
    plain = session.evaluate("linear", [{"weight": 1.0}, {"weight": 1.0}])
    assert _scores(result) == _scores(plain)
    with pytest.raises(ParameterError, match="'wieght'.*'ties'"):
        session.evaluate("ties", [{"wieght": 1.0}, {"weight": 1.0}])
    with pytest.raises(ParameterError, match="per-model parameter sets"):
        session.evaluate("ties", [{"weight": 1.0}])


def test_what_if_function_reuses_its_session(small):
    a = what_if(small["base"], [small["reverse"], small["shift"]], "task_arithmetic",
                [{"weight": 0.5}, {"weight": 0.5}], device="cpu", **EVAL)
    first = get_session(small["base"], [small["reverse"], small["shift"]], device="cpu", **EVAL)
    b = what_if(small["base"], [small["reverse"], small["shift"]], "task_arithmetic",
                [{"weight": 0.5}, {"weight": 0.5}], device="cpu", **EVAL)
    assert get_session(small["base"], [small["reverse"], small["shift"]], device="cpu", **EVAL) is first
    assert _scores(a) == _scores(b)
    assert set(a["seconds"]) == {"merge", "evaluate"}
