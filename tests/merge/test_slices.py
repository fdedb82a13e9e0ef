"""Layer stacks (frankenmerges): each output tensor against the source tensor it must come from,
rebuilt here from the input files by hand (no engine code); the config's per-layer lists; real
transformers loads (Llama, GPT-2, Qwen2); parity with real mergekit when MERGEKIT_YAML is set."""

from __future__ import annotations

import json
import os
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from engine.merge.executor import run_merge
from engine.merge.slices import is_pre_layer, rename_layer, stack_config
from engine.recipe import parse_recipe
from tests.io.builders import TINY_CONFIG, tiny_tensors, write_model
from tests.merge.test_mergekit_methods import load_tensors, mergekit_yaml


def folders(tmp_path, layers=(4, 4, 3)):
    out = {}
    for i, n in enumerate(layers):
        config = {**TINY_CONFIG, "num_hidden_layers": n,
                  "layer_types": ["full_attention"] * (n - 1) + ["sliding_attention"]}
        out[f"m{i}"] = write_model(tmp_path / f"m{i}", tiny_tensors(seed=i, layers=n), config)
    return out


def merge(recipe, out):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_merge(parse_recipe(recipe), out)


def src(folder, lo, hi, **params):
    return {"model": str(folder), "layer_range": [lo, hi], **({"parameters": params} if params else {})}


# ---------------------------------------------------------------- names and config
def test_rename_and_where_non_layer_tensors_go():
    assert rename_layer("model.layers.7.mlp.up_proj.weight", 12) == "model.layers.12.mlp.up_proj.weight"
    assert rename_layer("transformer.h.0.attn.c_attn.bias", 3) == "transformer.h.3.attn.c_attn.bias"
    assert [is_pre_layer(n) for n in ("model.embed_tokens.weight", "transformer.wte.weight",
                                      "transformer.wpe.weight", "model.norm.weight", "lm_head.weight",
                                      "transformer.ln_f.weight")] == [True, True, True, False, False, False]


def test_stack_config_rebuilds_per_layer_lists_from_the_layers_taken(tmp_path):
    from engine.io import ModelFolder

    f = folders(tmp_path, layers=(3, 2))
    a, b = ModelFolder(f["m0"]), ModelFolder(f["m1"])
    a.config["mlp_only_layers"] = [0, 2]
    sources = [(a, 2), (b, 1), (a, 0), (a, 1)]
    config = stack_config(dict(a.config), sources)
    assert config["num_hidden_layers"] == 4
    assert config["layer_types"] == ["sliding_attention", "sliding_attention", "full_attention",
                                     "full_attention"]
    assert config["mlp_only_layers"] == [0, 2]  # a's layers 2 and 0 sit at 0 and 2
    # a list some source does not have one entry per layer for is left out (transformers derives it)
    b.config["layer_types"] = ["full_attention"]
    assert "layer_types" not in stack_config(dict(a.config), sources)
    a.close(), b.close()


# ---------------------------------------------------------------- passthrough stacks
def test_passthrough_stack_takes_each_layer_from_its_source(tmp_path):
    f = folders(tmp_path)
    recipe = {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [src(f["m0"], 0, 3)]},
        {"sources": [src(f["m1"], 1, 4, scale=[{"filter": "q_proj", "value": 0.5}, {"value": 1.0}])]},
        {"sources": [src(f["m0"], 2, 4)]},            # overlaps the first slice: layer 2 again
        {"sources": [src(f["m2"], 0, 1, scale=2.0)]},  # a model of another depth
    ]}
    out = merge(recipe, tmp_path / "out").out
    got = load_tensors(out)
    ins = {k: load_tensors(v) for k, v in f.items()}
    plan = [("m0", 0, 1.0), ("m0", 1, 1.0), ("m0", 2, 1.0), ("m1", 1, None), ("m1", 2, None),
            ("m1", 3, None), ("m0", 2, 1.0), ("m0", 3, 1.0), ("m2", 0, 2.0)]
    expected = {"model.embed_tokens.weight": ins["m0"]["model.embed_tokens.weight"],
                "model.norm.weight": 2.0 * ins["m2"]["model.norm.weight"],
                "lm_head.weight": 2.0 * ins["m2"]["lm_head.weight"]}
    for i, (model, layer, scale) in enumerate(plan):
        for suffix in ("self_attn.q_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight"):
            t = ins[model][f"model.layers.{layer}.{suffix}"]
            factor = scale if scale is not None else (0.5 if "q_proj" in suffix else 1.0)
            expected[f"model.layers.{i}.{suffix}"] = t * factor
    assert sorted(got) == sorted(expected)
    for name, t in expected.items():
        assert torch.equal(got[name], t), name
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 9
    full, sliding = "full_attention", "sliding_attention"
    assert config["layer_types"] == [full, full, full, full, full, sliding, full, sliding, full]
    assert (out / "merge_recipe.yml").read_text().count("layer_range") == 4  # the recipe is kept


def test_a_slice_merges_its_sources_with_per_slice_gradients_and_base(tmp_path):
    """linear in a slice of two sources of different ranges: t runs over the slice's own layers
    (mergekit: t = k / (n - 1)); the slice's parameters win over the recipe's, a source's own
    over both; task_arithmetic finds the slice's base among its sources."""
    f = folders(tmp_path, layers=(4, 4, 4))
    ins = {k: load_tensors(v) for k, v in f.items()}
    recipe = {"merge_method": "linear", "dtype": "float32", "parameters": {"weight": 9.0}, "slices": [
        {"sources": [src(f["m0"], 0, 3), src(f["m1"], 1, 4, weight=[0.0, 1.0])],
         "parameters": {"weight": 1.0}},
        {"sources": [src(f["m2"], 3, 4)]}]}
    got = load_tensors(merge(recipe, tmp_path / "lin").out)
    for k in range(3):
        w1 = k / 2
        for suffix in ("mlp.up_proj.weight", "input_layernorm.weight"):
            a = ins["m0"][f"model.layers.{k}.{suffix}"].double()
            b = ins["m1"][f"model.layers.{k + 1}.{suffix}"].double()
            torch.testing.assert_close(got[f"model.layers.{k}.{suffix}"].double(),
                                       (a + w1 * b) / (1 + w1), rtol=1e-6, atol=1e-6)
    assert torch.equal(got["model.layers.3.mlp.up_proj.weight"], ins["m2"]["model.layers.3.mlp.up_proj.weight"])
    # non-layer tensors: t = 0, so m1's weight is 0 on the embeddings; the head from the last slice
    assert torch.equal(got["model.embed_tokens.weight"], ins["m0"]["model.embed_tokens.weight"])
    assert torch.equal(got["lm_head.weight"], ins["m2"]["lm_head.weight"])

    ta = {"merge_method": "task_arithmetic", "dtype": "float32", "slices": [
        {"base_model": str(f["m0"]), "sources": [src(f["m0"], 1, 3), src(f["m1"], 0, 2, weight=0.5)]}]}
    got = load_tensors(merge(ta, tmp_path / "ta").out)
    for k in range(2):
        name = f"model.layers.{k}.mlp.up_proj.weight"
        base = ins["m0"][f"model.layers.{k + 1}.mlp.up_proj.weight"].double()
        ft = ins["m1"][f"model.layers.{k}.mlp.up_proj.weight"].double()
        torch.testing.assert_close(got[name].double(), base + 0.5 * (ft - base), rtol=1e-6, atol=1e-6)
    assert sorted({n.split(".")[2] for n in got if n.startswith("model.layers.")}) == ["0", "1"]


def test_one_full_depth_slice_is_a_plain_merge(tmp_path):
    f = folders(tmp_path, layers=(4, 4))
    models = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": str(f["m0"]), "parameters": {"weight": 0.3}},
                         {"model": str(f["m1"]), "parameters": {"weight": 0.7}}]}
    sliced = {"merge_method": "linear", "dtype": "float32", "slices": [{"sources": [
        src(f["m0"], 0, 4, weight=0.3), src(f["m1"], 0, 4, weight=0.7)]}]}
    a, b = load_tensors(merge(models, tmp_path / "a").out), load_tensors(merge(sliced, tmp_path / "b").out)
    assert sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a)


# ---------------------------------------------------------------- real architectures
def _hf_family(root: Path, arch: str, n: int = 2) -> dict[str, Path]:
    """Tiny fp32 transformers models of one architecture (3 layers, random weights)."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    config = {
        "llama": LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                             tie_word_embeddings=False),
        "gpt2": GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=32,
                           tie_word_embeddings=True),
        "qwen2": Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                             tie_word_embeddings=True),
    }[arch]
    out = {}
    for i in range(n):
        torch.manual_seed(10 * i + len(arch))
        model = AutoModelForCausalLM.from_config(config).to(torch.float32)
        out[f"m{i}"] = root / arch / f"m{i}"
        model.save_pretrained(out[f"m{i}"], safe_serialization=True)
    return out


def frankenmerge_recipes(f: dict[str, Path], arch: str) -> dict[str, dict]:
    a, b = str(f["m0"]), str(f["m1"])
    o_proj = {"llama": "o_proj", "qwen2": "o_proj", "gpt2": "c_proj"}[arch]
    fp32 = {"dtype": "float32"}
    return {
        "self_merge": {"merge_method": "passthrough", **fp32, "slices": [
            {"sources": [{"model": a, "layer_range": [0, 2]}]},
            {"sources": [{"model": a, "layer_range": [1, 3]}]}]},
        "two_models_scaled": {"merge_method": "passthrough", **fp32, "slices": [
            {"sources": [{"model": a, "layer_range": [0, 2]}]},
            {"sources": [{"model": b, "layer_range": [1, 3], "parameters": {
                "scale": [{"filter": o_proj, "value": 0.0}, {"value": 1.0}]}}]},
            {"sources": [{"model": a, "layer_range": [2, 3]}]}]},
        "slerp_slices": {"merge_method": "slerp", "base_model": a, **fp32,
                         "parameters": {"t": [{"filter": "mlp", "value": [0.2, 0.8]}, {"value": 0.5}]},
                         "slices": [
                             {"sources": [{"model": a, "layer_range": [0, 2]}, {"model": b, "layer_range": [1, 3]}]},
                             {"sources": [{"model": a, "layer_range": [2, 3]}, {"model": b, "layer_range": [2, 3]}],
                              "parameters": {"t": 0.3}}]},
        "linear_partial": {"merge_method": "linear", **fp32, "slices": [
            {"sources": [{"model": a, "layer_range": [1, 3], "parameters": {"weight": 0.25}},
                         {"model": b, "layer_range": [1, 3], "parameters": {"weight": 0.75}}]}]},
    }


def loads(folder: Path) -> bool:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False)
    return bool(torch.isfinite(model(torch.tensor([[1, 5, 7, 9]])).logits).all())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_frankenmerges_load_in_transformers(tmp_path, arch):
    f = _hf_family(tmp_path, arch)
    for name, recipe in frankenmerge_recipes(f, arch).items():
        out = merge(recipe, tmp_path / "out" / name).out
        config = json.loads((out / "config.json").read_text())
        layers = sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0]
                     for s in recipe["slices"])
        assert config["n_layer" if arch == "gpt2" else "num_hidden_layers"] == layers
        if arch == "qwen2":
            assert len(config["layer_types"]) == layers
        assert loads(out), name


# ---------------------------------------------------------------- parity with mergekit
@pytest.fixture(scope="module")
def mk_frankenmerges(tmp_path_factory):
    exe = mergekit_yaml()
    if exe is None:
        pytest.skip("no mergekit venv (set MERGEKIT_YAML to its mergekit-yaml)")
    root = tmp_path_factory.mktemp("mk_slices")
    cases, args = {}, []
    for arch in ("llama", "gpt2", "qwen2"):
        f = _hf_family(root / "models", arch)
        for name, recipe in frankenmerge_recipes(f, arch).items():
            path = root / "recipes" / f"{arch}_{name}.yml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(recipe, sort_keys=False))
            cases[(arch, name)] = path
            args += [str(path), str(root / "mergekit" / f"{arch}_{name}")]
    proc = subprocess.run([str(Path(exe).parent / "python"), "-c", TOLERANT_DRIVER, *args],
                          capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                               "CUDA_VISIBLE_DEVICES": ""})
    if proc.returncode != 0:
        raise RuntimeError(f"mergekit's driver failed:\n{proc.stderr[-4000:]}")
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    return root, cases, failures


# mergekit's command-line entry point per recipe, in one process; a recipe mergekit fails on is
# recorded (its last error line), not fatal
TOLERANT_DRIVER = """
import json, sys, traceback
from mergekit.scripts.run_yaml import main
args = sys.argv[1:]
failed = {}
for recipe, out in zip(args[::2], args[1::2]):
    try:
        main([recipe, out, "--allow-crimes", "--no-lazy-unpickle", "--quiet", "--random-seed", "0"],
             standalone_mode=False)
    except Exception as err:
        failed[out] = (type(err).__name__ + ": " + str(err)).strip().splitlines()[-1]
print(json.dumps(failed))
"""


PARITY_CASES = [(arch, name) for arch in ("llama", "gpt2", "qwen2")
                for name in ("self_merge", "two_models_scaled", "slerp_slices", "linear_partial")]


@pytest.mark.parametrize("arch,name", PARITY_CASES)
def test_frankenmerges_match_mergekit(mk_frankenmerges, arch, name):
    from engine.recipe import load_recipe

    root, cases, failures = mk_frankenmerges
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours_dir = run_merge(load_recipe(cases[(arch, name)]), root / "ours" / f"{arch}_{name}").out
    assert loads(ours_dir)
    theirs_dir = root / "mergekit" / f"{arch}_{name}"
    if str(theirs_dir) in failures:
        # mergekit 0.1.5 sets num_hidden_layers but keeps Qwen2's layer_types: transformers 5
        # refuses that config when mergekit saves it, after its tensors are written; ours
        # loads (above), and the tensors are compared all the same
        assert arch == "qwen2" and "layer_types" in failures[str(theirs_dir)], failures[str(theirs_dir)]
        assert not (theirs_dir / "config.json").exists()
    ours, theirs = load_tensors(ours_dir), load_tensors(theirs_dir)
    assert sorted(ours) == sorted(theirs)
    for tensor, t in theirs.items():
        assert ours[tensor].dtype == t.dtype and ours[tensor].shape == t.shape, tensor
        scale = float(t.abs().max()) or 1.0
        diff = float((ours[tensor].double() - t.double()).abs().max())
        assert diff <= 1e-4 * scale, f"{tensor}: max |ours - mergekit| {diff:.3g} (max |mergekit| {scale:.3g})"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_repeated_layer_with_its_outputs_scaled_to_zero_changes_nothing(tmp_path, arch):
    """A self-merge repeating layer 1 with `scale: 0` on the projections that write to the
    residual stream (o_proj, down_proj) adds nothing to it: transformers computes the same
    logits as the original model (an end-to-end check of stacking, renaming, config and scale)."""
    from transformers import AutoModelForCausalLM

    f = _hf_family(tmp_path, arch, n=1)
    a = str(f["m0"])
    zero = [{"filter": "o_proj", "value": 0.0}, {"filter": "down_proj", "value": 0.0}, {"value": 1.0}]
    out = merge({"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": a, "layer_range": [0, 2]}]},
        {"sources": [{"model": a, "layer_range": [1, 2], "parameters": {"scale": zero}}]},
        {"sources": [{"model": a, "layer_range": [2, 3]}]}]}, tmp_path / "out").out
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    original = AutoModelForCausalLM.from_pretrained(a, trust_remote_code=False)
    stacked = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)
    assert stacked.config.num_hidden_layers == 4
    with torch.no_grad():
        torch.testing.assert_close(stacked(ids).logits, original(ids).logits, rtol=1e-5, atol=1e-5)
