"""The streaming recipe executor: layouts, parameters per tensor, atomic output, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from engine.errors import ConfigError, IncompatibleModelsError, NonFiniteError, ParameterError
from engine.io import ModelFolder, ModelWriter
from engine.merge.executor import merge_state_dicts, run_merge
from engine.recipe import load_recipe, parse_recipe


def _llama(tmp: Path, name: str, seed: int, *, vocab=64, dtype=torch.bfloat16, tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # same architecture init for every member of the family
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie)
    model = LlamaForCausalLM(config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if tie:
        state.pop("lm_head.weight", None)
    if seed:
        g = torch.Generator().manual_seed(seed)
        state = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    cfg = config.to_dict()
    with ModelWriter(tmp / name, config=cfg) as w:
        for k, v in state.items():
            w.add_tensor(k, v.to(dtype))
    return tmp / name


def _gpt2(tmp: Path, name: str, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    model = GPT2LMHeadModel(config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    if seed:
        g = torch.Generator().manual_seed(seed)
        state = {k: v + 0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                 for k, v in state.items()}
    with ModelWriter(tmp / name, config=config.to_dict()) as w:
        for k, v in state.items():
            w.add_tensor(k, v)
    return tmp / name


def _write_recipe(tmp: Path, data: dict) -> Path:
    path = tmp / "recipe.yml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("family")
    return {"base": _llama(tmp, "base", 0), "a": _llama(tmp, "a", 1), "b": _llama(tmp, "b", 2), "tmp": tmp}


def _load(path):
    with ModelFolder(path) as mf:
        return {n: t.clone() for n, t in mf.iter_tensors()}


def test_task_arithmetic_matches_float64_reference_and_loads(family, tmp_path):
    recipe = parse_recipe({
        "merge_method": "task_arithmetic", "base_model": str(family["base"]), "dtype": "bfloat16",
        "models": [{"model": str(family["base"])},  # mergekit lists the base too: it is skipped
                   {"model": str(family["a"]), "parameters": {"weight": 0.7}},
                   {"model": str(family["b"]), "parameters": {"weight": 0.4}}],
    })
    result = run_merge(recipe, tmp_path / "out", device="cpu")
    merged = _load(result.out)
    base, a, b = _load(family["base"]), _load(family["a"]), _load(family["b"])
    for name, w0 in base.items():
        ref = w0.double() + 0.7 * (a[name].double() - w0.double()) + 0.4 * (b[name].double() - w0.double())
        assert merged[name].dtype == torch.bfloat16
        # fp32 arithmetic then one rounding to bf16: within one bf16 ulp of the fp64 reference.
        torch.testing.assert_close(merged[name].double(), ref, rtol=2**-7, atol=1e-6)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(result.out)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 64) and torch.isfinite(logits).all()
    assert (result.out / "merge_recipe.yml").is_file()
    assert load_recipe(result.out / "merge_recipe.yml").merge_method == "task_arithmetic"


def test_merging_a_model_with_itself_gives_itself(family, tmp_path):
    recipe = parse_recipe({"merge_method": "ties", "base_model": str(family["base"]),
                           "parameters": {"normalize": True},
                           "models": [{"model": str(family["a"]), "parameters": {"weight": 1.0, "density": 1.0}},
                                      {"model": str(family["a"]), "parameters": {"weight": 1.0, "density": 1.0}}]})
    out = run_merge(recipe, tmp_path / "out", device="cpu").out
    a, merged = _load(family["a"]), _load(out)
    for name in a:
        torch.testing.assert_close(merged[name], a[name], rtol=0, atol=0)


def test_gradient_parameters_resolve_per_layer(family, tmp_path):
    # slerp t from 0 (layer 0: the base) to 1 (layer 1: the other model); outside layers t=0.
    recipe = parse_recipe({"merge_method": "slerp", "base_model": str(family["base"]),
                           "slices": [{"sources": [{"model": str(family["base"]), "layer_range": [0, 2]},
                                                   {"model": str(family["a"]), "layer_range": [0, 2]}]}],
                           "parameters": {"t": [0.0, 1.0]}})
    out = run_merge(recipe, tmp_path / "out", device="cpu").out
    base, a, merged = _load(family["base"]), _load(family["a"]), _load(out)
    for name in merged:
        want = a[name] if ".layers.1." in name else base[name]
        torch.testing.assert_close(merged[name].float(), want.float(), rtol=0, atol=1e-2)


def test_gpt2_tied_layout_merges_and_loads(tmp_path):
    base, a, b = (_gpt2(tmp_path, n, s) for n, s in (("base", 0), ("a", 1), ("b", 2)))
    recipe = parse_recipe({"merge_method": "linear",
                           "models": [{"model": str(a), "parameters": {"weight": 1.0}},
                                      {"model": str(b), "parameters": {"weight": 1.0}}]})
    out = run_merge(recipe, tmp_path / "out", device="cpu").out
    merged, ta, tb = _load(out), _load(a), _load(b)
    assert "lm_head.weight" not in merged
    torch.testing.assert_close(merged["transformer.h.0.attn.c_attn.weight"],
                               (ta["transformer.h.0.attn.c_attn.weight"] + tb["transformer.h.0.attn.c_attn.weight"]) / 2)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(model(torch.tensor([[1, 2]])).logits).all()


def test_tied_finetune_against_untied_base_reads_the_embedding(tmp_path):
    base = _llama(tmp_path, "base", 0)
    tied = _llama(tmp_path, "tied", 3, tie=True)
    recipe = parse_recipe({"merge_method": "task_arithmetic", "base_model": str(base),
                           "models": [{"model": str(tied), "parameters": {"weight": 1.0}}]})
    out = run_merge(recipe, tmp_path / "out", device="cpu").out
    merged, t = _load(out), _load(tied)
    torch.testing.assert_close(merged["lm_head.weight"], t["model.embed_tokens.weight"], rtol=0, atol=0)


def test_vocab_mismatch_is_refused_then_padded_from_base(tmp_path):
    base = _llama(tmp_path, "base", 0, vocab=64)
    small = _llama(tmp_path, "small", 1, vocab=60)
    data = {"merge_method": "task_arithmetic", "base_model": str(base),
            "models": [{"model": str(small), "parameters": {"weight": 1.0}}]}
    with pytest.raises(IncompatibleModelsError, match="vocab size 60"):
        run_merge(parse_recipe(data), tmp_path / "refused", device="cpu")
    assert not (tmp_path / "refused").exists()
    out = run_merge(parse_recipe({**data, "vocab_policy": "pad_from_base"}), tmp_path / "out", device="cpu").out
    merged, b = _load(out), _load(base)
    assert merged["model.embed_tokens.weight"].shape == (64, 32)
    torch.testing.assert_close(merged["model.embed_tokens.weight"][60:], b["model.embed_tokens.weight"][60:])


def test_bad_parameters_fail_before_any_output(family, tmp_path):
    bad = {"merge_method": "ties", "base_model": str(family["base"]),
           "models": [{"model": str(family["a"]), "parameters": {"weight": 1.0, "density": [0.5, 1.5]}}]}
    with pytest.raises(ParameterError, match="density"):
        run_merge(parse_recipe(bad), tmp_path / "out", device="cpu")
    typo = {"merge_method": "ties", "base_model": str(family["base"]),
            "models": [{"model": str(family["a"]), "parameters": {"wieght": 1.0}}]}
    with pytest.raises(ParameterError, match="wieght"):
        run_merge(parse_recipe(typo), tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_nonfinite_input_refused_naming_the_tensor_and_nothing_written(family, tmp_path):
    state = _load(family["a"])
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    src = tmp_path / "nan_model"
    with ModelWriter(src, config=ModelFolder(family["a"]).config) as w:
        for k, v in state.items():
            w.add_tensor(k, v)
    recipe = parse_recipe({"merge_method": "task_arithmetic", "base_model": str(family["base"]),
                           "models": [{"model": str(src), "parameters": {"weight": 1.0}}]})
    with pytest.raises(NonFiniteError, match="model.layers.1.mlp.up_proj.weight"):
        run_merge(recipe, tmp_path / "out", device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan_model"]


def test_missing_model_folder_and_lora_reference_are_clear(family, tmp_path):
    # a LoRA reference is read (BASE+ADAPTER): missing parts are named like any missing folder
    for ref, words in (("org/some-hub-model", "no such local model folder"),
                       ("a+lora", "models\\[0\\].model: no such local model folder")):
        recipe = parse_recipe({"merge_method": "linear", "models": [{"model": ref, "parameters": {"weight": 1}}]})
        with pytest.raises(ConfigError, match=words):
            run_merge(recipe, tmp_path / "out", device="cpu")


def test_recipe_rejects_unknown_keys_and_bad_dtype(tmp_path):
    path = _write_recipe(tmp_path, {"merge_method": "linear", "modles": []})
    with pytest.raises(ConfigError, match="modles"):
        load_recipe(path)
    with pytest.raises(ConfigError, match="dtype"):
        parse_recipe({"merge_method": "linear", "models": [{"model": "x"}], "dtype": "int3"})


def test_in_memory_merge_equals_the_streamed_merge(family, tmp_path):
    recipe = parse_recipe({"merge_method": "dare_ties", "base_model": str(family["base"]), "seed": 7,
                           "models": [{"model": str(family["a"]), "parameters": {"weight": 0.5, "density": 0.5}},
                                      {"model": str(family["b"]), "parameters": {"weight": 0.5, "density": 0.5}}]})
    streamed = _load(run_merge(recipe, tmp_path / "out", device="cpu").out)
    in_memory = merge_state_dicts("dare_ties", _load(family["base"]), [_load(family["a"]), _load(family["b"])],
                                  [{"weight": 0.5, "density": 0.5}] * 2, seed=7, num_layers=2, device="cpu")
    for name in streamed:
        torch.testing.assert_close(in_memory[name], streamed[name], rtol=0, atol=0)


def test_emr_streamed_merge_uses_one_model_wide_rescaler_per_task(family, tmp_path):
    """The streaming executor's first pass gives EMR the authors' rescalers (sums of per-tensor
    means over every tensor): the same result as the in-memory merge, and not the per-tensor one."""
    from engine.merge.methods.emr import emr_decompose, tensor_means

    base, fts = _load(family["base"]), [_load(family["a"]), _load(family["b"])]
    recipe = parse_recipe({"merge_method": "emr", "base_model": str(family["base"]),
                           "parameters": {"task": 1},
                           "models": [{"model": str(family["a"])}, {"model": str(family["b"])}]})
    streamed = _load(run_merge(recipe, tmp_path / "out", device="cpu").out)
    in_memory = merge_state_dicts("emr", base, fts, [{}] * 2, {"task": 1}, device="cpu")
    per_tensor = merge_state_dicts("emr", base, fts, [{}] * 2, {"task": 1, "rescale": "per_tensor"},
                                   device="cpu")
    total = sum(tensor_means(emr_decompose([ft[n].float() - base[n].float() for ft in fts]))
                for n in base)
    lam = float(total[0, 1] / total[1, 1])
    name = "model.layers.0.mlp.up_proj.weight"
    dec = emr_decompose([ft[name].float() - base[name].float() for ft in fts])
    expected = base[name].float() + lam * dec.mask(1) * dec.unified
    torch.testing.assert_close(streamed[name].float(), expected, rtol=0, atol=float(expected.abs().max()) / 128)
    differ = 0
    for n in streamed:
        torch.testing.assert_close(in_memory[n], streamed[n], rtol=0, atol=0)
        differ += int(not torch.equal(per_tensor[n], streamed[n]))
    assert differ > len(streamed) // 2


def test_cli_merge_writes_a_folder(family, tmp_path):
    import subprocess
    import sys

    path = _write_recipe(tmp_path, {"merge_method": "linear", "dtype": "float32",
                                    "models": [{"model": str(family["a"]), "parameters": {"weight": 1}},
                                               {"model": str(family["b"]), "parameters": {"weight": 1}}]})
    proc = subprocess.run([sys.executable, "-m", "engine", "merge", str(path), "--out", str(tmp_path / "m"),
                           "--json", "--quiet"], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr
    assert ModelFolder(tmp_path / "m").info("model.norm.weight").dtype == torch.float32
    bad = subprocess.run([sys.executable, "-m", "engine", "merge", str(path), "--out", str(tmp_path / "m")],
                         capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "not empty" in bad.stderr


@pytest.mark.parametrize("method, params", [("task_arithmetic", {"weight": 0.6}),
                                            ("ties", {"weight": 0.6, "density": 0.5})])
def test_pooled_buffers_two_thread_kernels_and_read_ahead_change_no_byte(family, tmp_path, monkeypatch,
                                                                         method, params):
    import json

    import engine.io.buffers as buffers
    from engine.io.names import MANIFEST_NAME
    from engine.merge import chunked, executor

    recipe = parse_recipe({
        "merge_method": method, "base_model": str(family["base"]), "dtype": "bfloat16",
        "models": [{"model": str(family["a"]), "parameters": params},
                   {"model": str(family["b"]), "parameters": params}]})
    monkeypatch.setattr(chunked, "workers", lambda: 1)
    monkeypatch.setattr(executor, "READ_AHEAD", 1)
    run_merge(recipe, tmp_path / "plain", device="cpu")
    # every piece of the machinery on, even for these tiny tensors
    monkeypatch.setattr(buffers, "MIN_POOLED", 64)
    monkeypatch.setattr(chunked, "CHUNK", 256)
    monkeypatch.setattr(chunked, "SPLIT_MIN_CHUNKS", 2)
    monkeypatch.setattr(chunked, "workers", lambda: 2)
    monkeypatch.setattr(executor, "READ_AHEAD", 3)
    monkeypatch.setattr(executor, "READ_AHEAD_BYTES", 10_000)
    reused = []
    real_empty = buffers.BufferPool.empty

    def counting(self, shape, dtype):
        tensor = real_empty(self, shape, dtype)
        reused.append(self.reused)
        return tensor

    monkeypatch.setattr(buffers.BufferPool, "empty", counting)
    result = run_merge(recipe, tmp_path / "machinery", device="cpu")
    assert reused and reused[-1] > 0  # buffers were handed out again
    plain, machinery = _load(tmp_path / "plain"), _load(tmp_path / "machinery")
    assert plain.keys() == machinery.keys()
    assert all(torch.equal(plain[n], machinery[n]) for n in plain)
    timings = json.loads((tmp_path / "machinery" / MANIFEST_NAME).read_text())["timings"]
    assert {"read", "merge", "write", "verify", "hash", "fsync"} <= set(timings)
    assert result.timings["wall"] > 0 and set(timings) <= set(result.timings)
