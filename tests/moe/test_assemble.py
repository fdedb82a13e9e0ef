"""MoE assembly end to end on tiny offline families: every output tensor against its source,
transformers loads and generates, an MoE of copies of the base computes the base's function,
the manifest and card, noise and residual scaling, tied embeddings."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from engine.moe import parse_moe_text, run_moe
from engine.textparse import parse_yaml
from tests.moe.builders import build_family, moe_config

import yaml


def _run(config: dict, out, **kw):
    return run_moe(parse_moe_text(yaml.safe_dump(config)), out, **kw)


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False).eval()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("llama"))


def test_mixtral_tensors_are_the_experts_and_the_base(llama, tmp_path):
    out = tmp_path / "moe"
    result = _run(moe_config(llama), out)
    assert result.architecture == "Mixtral"
    got, base = _weights(out), _weights(llama["base"])
    experts = [_weights(llama[f"e{i}"]) for i in range(3)]
    for layer in range(2):
        p = f"model.layers.{layer}.mlp"
        gate_up, down = got[f"{p}.experts.gate_up_proj"], got[f"{p}.experts.down_proj"]
        assert gate_up.shape == (3, 96, 32) and down.shape == (3, 32, 48)
        for e, ex in enumerate(experts):
            assert torch.equal(gate_up[e, :48], ex[f"{p}.gate_proj.weight"])
            assert torch.equal(gate_up[e, 48:], ex[f"{p}.up_proj.weight"])
            assert torch.equal(down[e], ex[f"{p}.down_proj.weight"])
        router = got[f"{p}.gate.weight"]
        assert router.shape == (3, 32)
        torch.testing.assert_close(router.norm(dim=1), torch.ones(3))
    for name, tensor in base.items():
        if ".mlp." not in name:
            assert torch.equal(got[name], tensor), name
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 3
    assert config["num_experts_per_tok"] == 2 and config["architectures"] == ["MixtralForCausalLM"]
    model = _load(out)
    ids = model.generate(torch.tensor([[1, 40, 41]]), max_new_tokens=3, do_sample=False)
    assert ids.shape == (1, 6)


@pytest.mark.parametrize("tie,policy", [(False, "keep"), (True, "keep"), (True, "untie")])
def test_an_moe_of_copies_of_the_base_is_the_base(tmp_path, tie, policy):
    """Each token's top-k weights sum to one, so identical experts give the dense MLP back:
    the MoE's logits are the base's (tied heads included, kept or written out)."""
    family = build_family(tmp_path / "fam", tie=tie, experts=0)
    config = moe_config({"base": family["base"], "e0": family["base"], "e1": family["base"],
                         "e2": family["base"]}, gate_mode="hidden", tied_embeddings=policy)
    out = tmp_path / "moe"
    result = _run(config, out)
    assert any("same model" in w for w in result.warnings)
    names = set(_weights(out))
    written = json.loads((out / "config.json").read_text())
    if tie and policy == "keep":
        assert "lm_head.weight" not in names and written["tie_word_embeddings"] is True
    else:
        assert "lm_head.weight" in names and written["tie_word_embeddings"] is False
    ids = torch.tensor([[1, 40, 41, 42, 43], [1, 50, 60, 70, 80]])
    with torch.no_grad():
        want = _load(family["base"])(ids).logits
        got = _load(out)(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_qwen_moe_with_a_shared_expert(tmp_path, kind):
    family = build_family(tmp_path / "fam", kind=kind)
    out = tmp_path / "moe"
    config = moe_config(family, experts=["e0", "e1"], shared="e2")
    result = _run(config, out)
    assert result.architecture == "Qwen MoE"
    got, shared, base = _weights(out), _weights(family["e2"]), _weights(family["base"])
    for layer in range(2):
        p = f"model.layers.{layer}"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(got[f"{p}.mlp.shared_expert.{proj}.weight"], shared[f"{p}.mlp.{proj}.weight"])
        assert got[f"{p}.mlp.shared_expert_gate.weight"].shape == (1, 32)
        assert got[f"{p}.mlp.gate.weight"].shape == (2, 32)
        for proj in ("q_proj", "k_proj", "v_proj"):
            bias = got[f"{p}.self_attn.{proj}.bias"]
            if kind == "llama":  # Qwen2-MoE's attention has biases: zeros keep Llama's function
                assert not bias.any()
            else:
                assert torch.equal(bias, base[f"{p}.self_attn.{proj}.bias"])
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == "qwen2_moe" and written["num_experts"] == 2
    assert written["moe_intermediate_size"] == written["shared_expert_intermediate_size"] == 48
    model = _load(out)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 40, 41]])).logits).all()


def test_manifest_card_and_side_files(llama, tmp_path):
    out = tmp_path / "moe"
    config = moe_config(llama)
    _run(config, out)
    manifest = json.loads((out / "delta_workbench_manifest.json").read_text())
    assert manifest["kind"] == "moe" and manifest["architecture"] == "Mixtral"
    for name, entry in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == entry["sha256"], name
    assert set(manifest["inputs"]) == {"base_model", "experts[0].source_model",
                                       "experts[1].source_model", "experts[2].source_model"}
    assert manifest["inputs"]["base_model"]["files"]  # fingerprints of the files read
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the base's, unchanged (mergekit
        # saves its gate-batching tokenizer, whose pad token it set to BOS)
        assert (out / name).read_bytes() == (llama["base"] / name).read_bytes()
    card = (out / "README.md").read_text()
    front = parse_yaml(card.split("---")[1])
    assert "moe" in front["tags"] and "mixtral" in front["tags"]
    again = parse_moe_text((out / "moe_config.yml").read_text())
    assert again == parse_moe_text(yaml.safe_dump(config))


def test_noise_is_seeded_and_residual_scale_scales_down_proj(llama, tmp_path):
    config = moe_config(llama)
    config["experts"][0]["noise_scale"] = 0.01
    config["experts"][2]["residual_scale"] = 0.5
    _run(config, tmp_path / "a")
    _run(config, tmp_path / "b")
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    e0, e2 = _weights(llama["e0"]), _weights(llama["e2"])
    p = "model.layers.1.mlp"
    assert torch.equal(a[f"{p}.experts.gate_up_proj"], b[f"{p}.experts.gate_up_proj"])
    noise = a[f"{p}.experts.gate_up_proj"][0, :48] - e0[f"{p}.gate_proj.weight"]
    assert 0.008 < float(noise.std()) < 0.012
    torch.testing.assert_close(a[f"{p}.experts.down_proj"][2], 0.5 * e2[f"{p}.down_proj.weight"])
    assert torch.equal(a[f"{p}.experts.gate_up_proj"][2, 48:], e2[f"{p}.up_proj.weight"])


def test_bfloat16_output(llama, tmp_path):
    out = tmp_path / "moe"
    _run(moe_config(llama, dtype="bfloat16", gate_mode="random"), out)
    assert {t.dtype for t in _weights(out).values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
