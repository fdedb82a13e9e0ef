"""GPT-2 (Conv1D weights, tied embeddings) and Qwen2 (q/k/v biases, tied embeddings) layouts:
merged outputs load in transformers and equal plain float64 references within bf16 rounding."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from engine.io import ModelFolder
from engine.merge.executor import run_merge
from engine.merge.params import layer_fraction
from engine.tensor_names import layer_index_of
from engine.recipe import parse_recipe

N_LAYERS = 2


def _config(arch: str):
    from transformers import GPT2Config, Qwen2Config

    if arch == "gpt2":
        return GPT2Config(vocab_size=80, n_embd=32, n_layer=N_LAYERS, n_head=4, n_positions=32,
                          tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    return Qwen2Config(vocab_size=80, hidden_size=32, intermediate_size=48, num_hidden_layers=N_LAYERS,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                       tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module", params=["gpt2", "qwen2"])
def fam(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    arch = request.param
    tmp = tmp_path_factory.mktemp(arch)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(_config(arch)).to(torch.bfloat16)
    base.save_pretrained(tmp / "base")
    state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    paths = {"base": tmp / "base", "arch": arch}
    for i, name in enumerate(("a", "b")):
        g = torch.Generator().manual_seed(10 + i)
        model = AutoModelForCausalLM.from_config(_config(arch)).to(torch.bfloat16)
        new = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v
               for k, v in state.items()}
        model.load_state_dict(new)
        model.save_pretrained(tmp / name)
        paths[name] = tmp / name
    return paths


def _load(path: Path) -> dict[str, torch.Tensor]:
    with ModelFolder(path) as mf:
        return {n: t.clone() for n, t in mf.iter_tensors()}


def _ties_reference(w0, fts, weights, densities):
    """Plain TIES in float64: stable top-k trim (lower index first among equal magnitudes),
    sign election of the weighted sum (zero counts as positive), disjoint weighted mean."""
    w0 = w0.double()
    kept = []
    for ft, k in zip(fts, densities):
        d = (ft.double() - w0).reshape(-1)
        order = torch.sort(d.abs(), descending=True, stable=True).indices
        mask = torch.zeros_like(d, dtype=torch.bool)
        mask[order[:max(1, int(k * d.numel()))]] = True
        kept.append((d * mask).reshape(w0.shape))
    weighted = [w * d for w, d in zip(weights, kept)]
    elected = torch.where(sum(weighted) >= 0, 1.0, -1.0).double()
    num = torch.zeros_like(w0)
    den = torch.zeros_like(w0)
    for w, wd in zip(weights, weighted):
        agree = torch.sign(wd) == elected
        num += wd * agree
        den += w * agree
    return w0 + num / torch.where(den == 0, torch.ones_like(den), den)


def _slerp_reference(t, v0, v1):
    v0, v1 = v0.double().reshape(-1), v1.double().reshape(-1)
    unit = [v / v.norm() if v.norm() > 1e-8 else v for v in (v0, v1)]  # zero biases: not normalised
    dot = float(unit[0] @ unit[1])
    if abs(dot) > 0.9995:
        return (1 - t) * v0 + t * v1
    theta = math.acos(dot)
    return (math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1) / math.sin(theta)


def _check_loads(out: Path, vocab: int = 80):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([[1, 5, 9, 3]])).logits
    assert logits.shape == (1, 4, vocab) and torch.isfinite(logits).all()
    return model


def _assert_bf16_close(merged, reference, name):
    assert merged.dtype == torch.bfloat16, name
    # fp32 arithmetic then one rounding to bf16: within one bf16 ulp of the float64 value
    torch.testing.assert_close(merged.double(), reference, rtol=2 ** -7, atol=1e-6, msg=name)


def test_task_arithmetic_and_ties_give_the_float64_reference(fam, tmp_path):
    base, a, b = (_load(fam[k]) for k in ("base", "a", "b"))
    assert "lm_head.weight" not in base  # tied: the head is the embedding
    if fam["arch"] == "gpt2":  # Conv1D stores (in, out): c_attn is (n_embd, 3 n_embd)
        assert base["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)
    for method, params, mps in (
        ("task_arithmetic", {"lambda": 0.8}, [{"weight": 0.7}, {"weight": 0.4}]),
        ("ties", {}, [{"weight": 1.0, "density": 0.4}, {"weight": 0.6, "density": 0.7}]),
    ):
        recipe = parse_recipe({"merge_method": method, "base_model": str(fam["base"]), "parameters": params,
                               "dtype": "bfloat16",
                               "models": [{"model": str(fam["a"]), "parameters": mps[0]},
                                          {"model": str(fam["b"]), "parameters": mps[1]}]})
        out = run_merge(recipe, tmp_path / method, device="cpu").out
        merged = _load(out)
        assert set(merged) == set(base)
        for name, w0 in base.items():
            if not w0.is_floating_point():
                continue
            if method == "task_arithmetic":
                ref = w0.double() + 0.8 * sum(mp["weight"] * (ft[name].double() - w0.double())
                                              for mp, ft in zip(mps, (a, b)))
            else:
                ref = _ties_reference(w0, [a[name], b[name]], [1.0, 0.6], [0.4, 0.7])
            assert merged[name].shape == w0.shape
            _assert_bf16_close(merged[name], ref, f"{method} {name}")
        _check_loads(out)


def test_slerp_gradient_per_layer_gives_the_reference_and_loads(fam, tmp_path):
    base, a = _load(fam["base"]), _load(fam["a"])
    recipe = parse_recipe({"merge_method": "slerp", "base_model": str(fam["base"]), "dtype": "bfloat16",
                           "slices": [{"sources": [{"model": str(fam["base"]), "layer_range": [0, N_LAYERS]},
                                                   {"model": str(fam["a"]), "layer_range": [0, N_LAYERS]}]}],
                           "parameters": {"t": [0.2, 0.9]}})
    merged = _load(run_merge(recipe, tmp_path / "slerp", device="cpu").out)
    for name, w0 in base.items():
        t = 0.2 + 0.7 * layer_fraction(layer_index_of(name), N_LAYERS)
        ref = _slerp_reference(t, w0, a[name]).reshape(w0.shape)
        _assert_bf16_close(merged[name], ref, name)
    _check_loads(tmp_path / "slerp")


def test_merging_a_finetune_alone_with_weight_one_reproduces_its_logits(fam, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = parse_recipe({"merge_method": "task_arithmetic", "base_model": str(fam["base"]),
                           "models": [{"model": str(fam["a"]), "parameters": {"weight": 1.0}}]})
    out = run_merge(recipe, tmp_path / "same", device="cpu").out
    merged = _check_loads(out).float()
    original = AutoModelForCausalLM.from_pretrained(fam["a"]).float()
    ids = torch.tensor([[1, 7, 3, 22, 9]])
    torch.testing.assert_close(merged(ids).logits, original(ids).logits, rtol=0, atol=0)
