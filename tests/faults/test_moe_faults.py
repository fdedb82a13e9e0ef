"""Issue 12 item 4, bad input to the MoE assembly: each refused before any work with one line
naming the config key (and the model), nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from engine.errors import ConfigError, IncompatibleModelsError, NonFiniteError, ParameterError
from engine.moe import load_moe_config, parse_moe_text, run_moe
from tests.faults.refusal import assert_refused
from tests.moe.builders import build_family, moe_config, write_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_faults")
    folders = build_family(root / "llama")
    folders["qwen"] = build_family(root / "qwen", kind="qwen2", experts=0)["base"]
    wide = build_family(root / "wide", experts=0)["base"]  # same config but a wider MLP
    cfg = json.loads((wide / "config.json").read_text())
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg_obj = LlamaConfig(**{**cfg, "intermediate_size": 64})
    AutoModelForCausalLM.from_config(cfg_obj).save_pretrained(wide)
    folders["wide"] = wide
    return folders


def _assemble(config: dict, out: Path):
    return lambda: run_moe(parse_moe_text(yaml.safe_dump(config)), out)


def test_an_expert_of_another_architecture(family, tmp_path):
    config = moe_config(family)
    config["experts"][1]["source_model"] = str(family["qwen"])
    assert_refused(tmp_path, _assemble(config, tmp_path / "out"), IncompatibleModelsError,
                   "experts[1].source_model", "model_type", str(family["qwen"]))


def test_an_expert_of_another_shape(family, tmp_path):
    config = moe_config(family)
    config["experts"][2]["source_model"] = str(family["wide"])
    assert_refused(tmp_path, _assemble(config, tmp_path / "out"), IncompatibleModelsError,
                   "experts[2].source_model", "intermediate_size")


def test_an_unknown_gate_mode(family, tmp_path):
    assert_refused(tmp_path, _assemble(moe_config(family, gate_mode="learned"), tmp_path / "out"),
                   ParameterError, "gate_mode", "learned")


@pytest.mark.parametrize("k", [0, -1, 4])
def test_experts_per_token_out_of_range(family, tmp_path, k):
    assert_refused(tmp_path, _assemble(moe_config(family, experts_per_token=k), tmp_path / "out"),
                   ParameterError, "experts_per_token", str(k))


@pytest.mark.parametrize("gate", ["hidden", "cheap_embed"])
def test_an_expert_without_prompts(family, tmp_path, gate):
    config = moe_config(family, gate_mode=gate)
    del config["experts"][1]["positive_prompts"]
    assert_refused(tmp_path, _assemble(config, tmp_path / "out"), ParameterError,
                   "experts[1].positive_prompts", gate)


def test_random_gates_need_no_prompts(family, tmp_path):
    config = moe_config(family, gate_mode="random")
    for expert in config["experts"]:
        expert.pop("positive_prompts"), expert.pop("negative_prompts", None)
    run_moe(parse_moe_text(yaml.safe_dump(config)), tmp_path / "out")
    assert (tmp_path / "out" / "config.json").exists()


def test_a_missing_model(family, tmp_path):
    config = moe_config(family)
    config["experts"][0]["source_model"] = str(tmp_path / "nowhere")
    assert_refused(tmp_path, _assemble(config, tmp_path / "out"), ConfigError,
                   "experts[0].source_model", "nowhere")


def test_a_misspelt_key(family, tmp_path):
    config = moe_config(family)
    config["expert_per_token"] = config.pop("experts_per_token")
    assert_refused(tmp_path, _assemble(config, tmp_path / "out"), ConfigError, "expert_per_token")


def test_identical_prompts_for_every_expert(family, tmp_path):
    config = moe_config(family)
    for expert in config["experts"]:
        expert["positive_prompts"], expert["negative_prompts"] = ["same="], []
    assert_refused(tmp_path, _assemble(config, tmp_path / "out"), ParameterError, "experts", "same prompts")


def test_shared_experts_need_a_qwen_moe_output(family, tmp_path):
    two = moe_config(family, experts=["e0", "e1"], shared="e2")
    two["shared_experts"].append({"source_model": str(family["e0"]), "positive_prompts": ["x="]})
    assert_refused(tmp_path, _assemble(two, tmp_path / "out"), ParameterError, "shared_experts", "exactly one")
    mixtral = moe_config(family, experts=["e0", "e1"], shared="e2", architecture="mixtral")
    assert_refused(tmp_path, _assemble(mixtral, tmp_path / "out"), ParameterError, "shared_experts")
    deepseek = moe_config(family, architecture="deepseek")
    assert_refused(tmp_path, _assemble(deepseek, tmp_path / "out"), ParameterError, "architecture", "deepseek")


def test_a_base_mixtral_cannot_be_built_from(family, tmp_path):
    config = moe_config(family)
    config["base_model"] = str(family["qwen"])
    assert_refused(tmp_path, _assemble(config, tmp_path / "out"), IncompatibleModelsError,
                   "base_model", "qwen2")


def test_an_alias_bomb_is_refused_by_the_strict_loader(family, tmp_path):
    path = tmp_path / "bomb.yml"
    path.write_text(yaml.safe_dump(moe_config(family)) + "notes: &a [x, x]\nmore: [*a, *a]\n")
    assert_refused(tmp_path, lambda: load_moe_config(path), ConfigError, str(path))


def test_nan_in_an_expert_leaves_nothing(family, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (bad / name).write_bytes((family["e1"] / name).read_bytes())
    tensors = load_file(family["e1"] / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    config = moe_config(family)
    config["experts"][1]["source_model"] = str(bad)
    assert_refused(tmp_path, _assemble(config, tmp_path / "out"), NonFiniteError,
                   "model.layers.1.mlp.up_proj.weight", str(bad))
    assert not torch.isfinite(tensors["model.layers.1.mlp.up_proj.weight"]).all()


def test_the_command_line_prints_one_line(family, tmp_path):
    config = moe_config(family, experts_per_token=9)
    path = write_config(tmp_path / "moe.yml", config)
    proc = subprocess.run([sys.executable, "-m", "engine", "moe", str(path), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "experts_per_token" in proc.stderr and not (tmp_path / "out").exists()


def test_a_gpt2_family_has_no_moe_output(family, tmp_path):
    """mergekit-moe finds no output architecture for GPT-2 either; ours says which key."""
    from tests.lora.peft_builders import tiny_gpt2

    models = tmp_path / "gpt2"
    for name in ("base", "a", "b"):
        tiny_gpt2(models / name, seed=len(name))
    config = {"base_model": str(models / "base"), "gate_mode": "random",
              "experts": [{"source_model": str(models / "a")}, {"source_model": str(models / "b")}]}
    assert_refused(tmp_path, _assemble(config, tmp_path / "out"), IncompatibleModelsError,
                   "base_model", "gpt2", "llama or mistral")


def test_prompt_gates_over_a_base_without_a_tokenizer(tmp_path):
    """A base whose folder has no tokenizer files (and not the zoo's vocabulary) cannot encode
    the prompts: refused naming base_model, before the gates or any output."""
    from tests.lora.peft_builders import tiny_llama

    models = tmp_path / "bare"
    for name in ("base", "a", "b"):
        tiny_llama(models / name, seed=len(name))
    config = {"base_model": str(models / "base"), "gate_mode": "cheap_embed",
              "experts": [{"source_model": str(models / "a"), "positive_prompts": ["x"]},
                          {"source_model": str(models / "b"), "positive_prompts": ["y"]}]}
    assert_refused(tmp_path, _assemble(config, tmp_path / "out"), ConfigError,
                   "base_model", "tokenizer")
