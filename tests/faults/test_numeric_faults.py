"""Issue 19 items 5, 9 and 10 (part): numbers a merge or a compression must not change or hide.

- the values written are checked after the cast to the output dtype (a finite float32 3e38 is
  Inf in float16): refused naming the tensor, nothing left behind, or clamped on the recipe's
  explicit ``overflow: clamp``;
- integer and bool tensors are copied from the base, never mixed in float32 (refused naming
  the model when they differ), float64 is computed in float64, and a model merged with itself
  is itself bit for bit, whatever its dtypes;
- a NaN in the base is blamed on the base (compress, analysis), not on the fine-tune.
"""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from engine.__main__ import main
from engine.compress import compress, decompress, rebuild_state_dict
from engine.delta import plan_deltas, read_tensors
from engine.errors import ArtifactError, ConfigError, IncompatibleModelsError, NonFiniteError
from engine.io import ModelFolder
from engine.merge import get_method, list_methods
from engine.merge.executor import merge_state_dicts, run_merge
from engine.recipe import parse_recipe
from tests.io.builders import snapshot, staging_leftovers, tiny_tensors, write_model

HOT = "model.layers.1.mlp.up_proj.weight"  # the tensor given a value float16 cannot hold


@pytest.fixture(autouse=True)
def _quiet_ignored_parameters():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _mixed(seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny model holding every dtype a checkpoint may: fp32/fp16/bf16/fp64, int64, bool."""
    t = tiny_tensors(seed=seed)
    t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"].double() / 3
    t["model.layers.1.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"].half()
    t["model.norm.weight"] = t["model.norm.weight"].bfloat16()
    t["model.position_ids"] = torch.tensor([2**40 + 1, 3, -(2**53) - 1], dtype=torch.int64)
    t["model.attention_mask"] = torch.tensor([[True, False, False], [False, True, True]])
    return t


def _recipe(method: str, base, models, **extra):
    params = {"t": 0.3} if method in ("slerp", "nearswap") else {}
    return parse_recipe({"merge_method": method, "base_model": str(base),
                         "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
                         "parameters": params, **extra})


def _stats_for(method: str):
    # fisher/regmean would calibrate on prompts; their statistics do not matter here
    return (lambda name: None) if method in ("fisher", "regmean") else None


def _read_all(folder) -> dict[str, torch.Tensor]:
    with ModelFolder(folder) as f:
        return {n: f.get_tensor(n).clone() for n in f.tensor_names}


def _no_trace(tmp_path, before, out):
    assert not out.exists()
    assert not out.parent.exists() or staging_leftovers(out.parent) == []
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- 5: overflow after the cast
def _hot_pair(tmp_path):
    a, b = tiny_tensors(seed=1), tiny_tensors(seed=2)
    a[HOT][0, 0] = 1e5  # finite in float32, Inf in float16 (beyond 65504)
    b[HOT][0, 0] = 1e5
    return write_model(tmp_path / "a", a), write_model(tmp_path / "b", b)


@pytest.mark.parametrize("method", ["linear", "slerp", "model_stock"])  # fast kernel, general path
def test_a_merge_overflowing_the_output_dtype_is_refused_naming_the_tensor(tmp_path, method):
    a, b = _hot_pair(tmp_path)
    models = {"linear": [a, b], "slerp": [b],
              "model_stock": [b, shutil.copytree(b, tmp_path / "b2")]}[method]
    recipe = _recipe(method, a, models, out_dtype="float16")
    out = tmp_path / "out" / "merged"
    before = snapshot(tmp_path)
    with pytest.raises(NonFiniteError) as info:
        run_merge(recipe, out)
    message = str(info.value)
    assert info.value.tensor == HOT and HOT in message
    assert "overflow" in message and "float16" in message and "\n" not in message
    _no_trace(tmp_path, before, out)


def test_overflow_clamp_writes_the_largest_finite_value(tmp_path):
    a, b = _hot_pair(tmp_path)
    recipe = _recipe("linear", a, [a, b], out_dtype="float16", overflow="clamp")
    assert "overflow: clamp" in recipe.to_yaml()  # kept in the recipe written beside the model
    out = run_merge(recipe, tmp_path / "merged").out
    merged = _read_all(out)
    assert merged[HOT].dtype == torch.float16 and float(merged[HOT][0, 0]) == 65504.0
    assert all(torch.isfinite(t).all() for t in merged.values())


def test_overflow_policy_is_validated():
    with pytest.raises(ConfigError, match="overflow"):
        parse_recipe({"merge_method": "linear", "models": [{"model": "x"}], "overflow": "wrap"})
    assert parse_recipe({"merge_method": "linear", "models": [{"model": "x"}]}).overflow == "refuse"


def test_the_in_memory_merge_checks_the_cast_too():
    base = {HOT: torch.full((2, 2), 3e38)}  # 3e38 is finite in float32, Inf in float16
    with pytest.raises(NonFiniteError, match="overflow the output dtype float16") as info:
        merge_state_dicts("linear", None, [base, base], [{"weight": 1.0}, {"weight": 2.0}],
                          out_dtype=torch.float16)
    assert info.value.tensor == HOT


def test_a_rebuilt_value_beyond_float16_is_refused_at_decompress(tmp_path):
    # the base is float32, the fine-tune float16: magnitude pruning drops the one small delta,
    # so that entry is rebuilt as the base's 70000, which float16 cannot hold
    b, f = tiny_tensors(seed=3), tiny_tensors(seed=3)
    b[HOT] = torch.zeros_like(b[HOT])
    b[HOT][0, 0] = 70000.0
    f[HOT] = torch.full_like(b[HOT], 60000.0).half()
    f[HOT][0, 0] = 65504.0
    base, ft = write_model(tmp_path / "base", b), write_model(tmp_path / "ft", f)
    art = compress(base, ft, tmp_path / "art", "magnitude", params={"density": 0.5}).out
    out = tmp_path / "out" / "rebuilt"
    before = snapshot(tmp_path)
    with pytest.raises(NonFiniteError) as info:
        decompress(art, base, out)
    assert info.value.tensor == HOT and str(art) in str(info.value) and "float16" in str(info.value)
    _no_trace(tmp_path, before, out)
    with pytest.raises(NonFiniteError, match="float16"):
        rebuild_state_dict(art, base, dtype=torch.float16)


# ---------------------------------------------------------------- 9: dtypes are kept
@pytest.mark.parametrize("method", list_methods())
def test_a_model_merged_with_itself_is_itself_bit_for_bit_whatever_the_dtypes(tmp_path, method):
    tensors = _mixed()
    x = write_model(tmp_path / "x", tensors)
    copies = [shutil.copytree(x, tmp_path / f"x{i}") for i in (1, 2)]
    recipe = _recipe(method, x, copies[:get_method(method).max_models or len(copies)])
    merged = _read_all(run_merge(recipe, tmp_path / "merged", stats_provider=_stats_for(method)).out)
    assert sorted(merged) == sorted(tensors)
    for name, tensor in tensors.items():
        assert merged[name].dtype == tensor.dtype, name
        assert torch.equal(merged[name], tensor), name


@pytest.mark.parametrize("method", ["linear", "slerp", "ties"])
@pytest.mark.parametrize("tensor", ["model.position_ids", "model.attention_mask"])
def test_integer_and_bool_tensors_that_differ_are_refused_naming_the_model(tmp_path, method, tensor):
    base_t, other_t = _mixed(), _mixed(seed=1)
    other_t["model.position_ids"] = base_t["model.position_ids"].clone()
    other_t["model.attention_mask"] = base_t["model.attention_mask"].clone()
    other_t[tensor] = ~other_t[tensor] if other_t[tensor].dtype == torch.bool else other_t[tensor] + 1
    base, other = write_model(tmp_path / "base", base_t), write_model(tmp_path / "other", other_t)
    out = tmp_path / "out" / "merged"
    before = snapshot(tmp_path)
    with pytest.raises(IncompatibleModelsError) as info:
        run_merge(_recipe(method, base, [other]), out)
    assert info.value.tensor == tensor and str(other) in str(info.value)
    _no_trace(tmp_path, before, out)


def test_the_recipe_dtype_converts_float_tensors_only(tmp_path):
    a, b = _mixed(seed=1), _mixed(seed=2)
    for name in ("model.position_ids", "model.attention_mask"):
        b[name] = a[name].clone()
    fa, fb = write_model(tmp_path / "a", a), write_model(tmp_path / "b", b)
    merged = _read_all(run_merge(_recipe("linear", fa, [fa, fb], dtype="bfloat16"),
                                 tmp_path / "merged").out)
    assert merged["model.position_ids"].dtype == torch.int64
    assert torch.equal(merged["model.position_ids"], a["model.position_ids"])
    assert torch.equal(merged["model.attention_mask"], a["model.attention_mask"])
    assert merged[HOT].dtype == torch.bfloat16


def test_float64_is_merged_in_float64(tmp_path):
    a, b = tiny_tensors(torch.float64, seed=1), tiny_tensors(torch.float64, seed=2)
    a[HOT] = a[HOT] * (1 + 2**-40)  # differences float32 cannot see
    fa, fb = write_model(tmp_path / "a", a), write_model(tmp_path / "b", b)
    merged = _read_all(run_merge(_recipe("linear", fa, [fa, fb]), tmp_path / "merged").out)
    for name in a:
        assert merged[name].dtype == torch.float64
        torch.testing.assert_close(merged[name], (a[name] + b[name]) / 2, rtol=1e-15, atol=0)


def test_the_in_memory_merge_keeps_integer_tensors():
    ids = torch.tensor([2**40 + 1, 7])
    state = {"w": torch.ones(2, 2), "ids": ids}
    out = merge_state_dicts("linear", None, [state, dict(state)], [{"weight": 1.0}] * 2,
                            out_dtype=torch.float32)
    assert out["ids"].dtype == torch.int64 and torch.equal(out["ids"], ids)


def test_compression_restores_integer_tensors_exactly_and_refuses_changed_ones(tmp_path):
    b, f = _mixed(seed=1), _mixed(seed=2)
    for name in ("model.position_ids", "model.attention_mask"):
        f[name] = b[name].clone()
    base, ft = write_model(tmp_path / "base", b), write_model(tmp_path / "ft", f)
    art = compress(base, ft, tmp_path / "art", "magnitude", ratio=4.0).out
    rebuilt = _read_all(decompress(art, base, tmp_path / "rebuilt").out)
    for name in ("model.position_ids", "model.attention_mask"):
        assert rebuilt[name].dtype == f[name].dtype and torch.equal(rebuilt[name], f[name]), name
    assert rebuilt["model.layers.0.mlp.up_proj.weight"].dtype == torch.float64
    state = rebuild_state_dict(art, base)
    assert torch.equal(state["model.position_ids"], f["model.position_ids"])

    f["model.position_ids"][0] += 1
    changed = write_model(tmp_path / "changed", f)
    out = tmp_path / "art2"
    before = snapshot(tmp_path)
    with pytest.raises(IncompatibleModelsError) as info:
        compress(base, changed, out, "magnitude", ratio=4.0)
    assert info.value.tensor == "model.position_ids" and str(changed) in str(info.value)
    _no_trace(tmp_path, before, out)


# ---------------------------------------------------------------- 10: the NaN's own folder
def test_compress_names_the_folder_holding_the_nan(tmp_path, capsys):
    for where in ("base", "ft"):  # a NaN in the base used to be blamed on the fine-tune
        b, f = tiny_tensors(seed=1), tiny_tensors(seed=2)
        (b if where == "base" else f)[HOT][1, 2] = float("nan")
        base = write_model(tmp_path / where / "base", b)
        ft = write_model(tmp_path / where / "ft", f)
        out = tmp_path / where / "art"
        before = snapshot(tmp_path)
        code = main(["compress", "--base", str(base), "--finetuned", str(ft), "--method",
                     "magnitude", "--ratio", "4", "--out", str(out), "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in err and "Traceback" not in err
        guilty, innocent = (base, ft) if where == "base" else (ft, base)
        assert err.startswith(f"error: {guilty}: tensor '{HOT}'"), err
        assert f"{innocent}:" not in err
        _no_trace(tmp_path, before, out)


def test_analysis_blames_a_nan_in_the_base_on_the_base(tmp_path):
    b, f = tiny_tensors(seed=1), tiny_tensors(seed=2)
    b[HOT][0, 1] = float("inf")
    base, ft = write_model(tmp_path / "base", b), write_model(tmp_path / "ft", f)
    with ModelFolder(base) as bf, ModelFolder(ft) as ff:
        with pytest.raises(NonFiniteError) as info:
            read_tensors(plan_deltas(bf, [ff]), HOT)
    assert info.value.path == str(base) and info.value.tensor == HOT


def test_a_1d_delta_beyond_float16_names_the_tensor_and_the_fine_tune(tmp_path):
    b, f = tiny_tensors(seed=1), tiny_tensors(seed=1)
    f["model.norm.weight"][0] = 1e6
    base, ft = write_model(tmp_path / "base", b), write_model(tmp_path / "ft", f)
    with pytest.raises(ArtifactError) as info:
        compress(base, ft, tmp_path / "art", "magnitude", ratio=4.0)
    assert info.value.tensor == "model.norm.weight" and info.value.path == str(ft)
    assert not (tmp_path / "art").exists()
