"""Hostile or unusable LoRA adapter folders: each a named one-line error naming the file (and
module or tensor), raised before any tensor arithmetic, with nothing written anywhere."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from engine.errors import CheckpointFormatError, ConfigError, IncompatibleModelsError, PathNotAllowedError, UnsafeFormatError
from engine.io import ModelFolder
from engine.lora import LoraAdapter
from tests.faults.refusal import assert_refused
from tests.lora.peft_builders import make_adapter, tiny_gpt2, tiny_llama


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    model = tiny_llama(root / "base")
    make_adapter(model, root / "adapter", target_modules=["q_proj", "v_proj"])
    return root


def _copy_adapter(src, dest):
    dest.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (dest / name).write_bytes((src / name).read_bytes())
    return dest


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def refused(tmp_path, folder, error_type, *needles, base=None):
    def action():
        adapter = LoraAdapter(folder)
        if base is not None:
            with ModelFolder(base) as b:
                adapter.check_base({n: b.info(n).shape for n in b.tensor_names}, b.path)

    assert_refused(tmp_path, action, error_type, *needles)


def test_dora_is_refused_naming_it(tmp_path, llama_pair):
    model = tiny_llama(tmp_path / "base")
    make_adapter(model, tmp_path / "dora", target_modules=["q_proj"], use_dora=True)
    refused(tmp_path, tmp_path / "dora", ConfigError, "adapter_config.json", "DoRA")


def test_other_adapter_types_are_refused_naming_the_type(tmp_path):
    import copy

    from peft import LoHaConfig, get_peft_model

    model = tiny_llama(tmp_path / "base")
    get_peft_model(copy.deepcopy(model), LoHaConfig(target_modules=["q_proj"])).save_pretrained(
        tmp_path / "loha")
    refused(tmp_path, tmp_path / "loha", ConfigError, "adapter_config.json", "'LOHA'", "LoRA")


def test_pickle_adapter_is_refused_unopened(tmp_path, llama_pair, monkeypatch):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes((llama_pair / "adapter" / "adapter_config.json").read_bytes())
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04 would run code")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    refused(tmp_path, folder, UnsafeFormatError, "adapter_model.bin", "pickle")


def test_config_rank_disagreeing_with_tensors(tmp_path, llama_pair):
    folder = _copy_adapter(llama_pair / "adapter", tmp_path / "a")
    _edit_config(folder, r=8)
    refused(tmp_path, folder, CheckpointFormatError, "adapter_model.safetensors", "q_proj", "r=8")


def test_a_and_b_ranks_disagree(tmp_path):
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 3)},
              folder / "adapter_model.safetensors")
    refused(tmp_path, folder, CheckpointFormatError, "adapter_model.safetensors", "rank mismatch",
            "q_proj")


def test_adapter_for_another_architecture(tmp_path, llama_pair):
    gpt2 = tiny_gpt2(tmp_path / "gpt2")
    make_adapter(gpt2, tmp_path / "gpt2_adapter", target_modules=["c_attn"], fan_in_fan_out=True)
    refused(tmp_path, tmp_path / "gpt2_adapter", IncompatibleModelsError, "gpt2_adapter",
            "name nothing in the base", "c_attn", base=llama_pair / "base")


def test_adapter_shape_mismatch_names_the_module(tmp_path, llama_pair):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    wide = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2))
    make_adapter(wide, tmp_path / "wide_adapter", target_modules=["q_proj"])
    refused(tmp_path, tmp_path / "wide_adapter", IncompatibleModelsError, "wide_adapter",
            "q_proj", "does not match", base=llama_pair / "base")


def test_target_modules_missing_from_base(tmp_path, llama_pair):
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["nonexistent"]}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 32),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 2),
               "base_model.model.model.layers.0.nonexistent.lora_A.weight": torch.zeros(2, 32),
               "base_model.model.model.layers.0.nonexistent.lora_B.weight": torch.zeros(32, 2)},
              folder / "adapter_model.safetensors")
    refused(tmp_path, folder, IncompatibleModelsError, "nonexistent", "not in the base",
            base=llama_pair / "base")


@pytest.mark.parametrize("changes, needle", [
    ({"layer_replication": [[0, 2], [1, 2]]}, "'layer_replication'"),
    ({"init_lora_weights": "pissa_niter_4"}, "rewrote the base"),
    ({"r": 0}, "r must be a positive"),
    ({"rank_pattern": {"q_proj": "four"}}, "not a positive integer"),
    ({"rank_pattern": {"(": 2}}, "not a valid regular expression"),
], ids=["layer-replication", "pissa", "zero-rank", "bad-pattern-rank", "bad-regex"])
def test_config_keys_that_change_the_meaning(tmp_path, llama_pair, changes, needle):
    folder = _copy_adapter(llama_pair / "adapter", tmp_path / "a")
    _edit_config(folder, **changes)
    refused(tmp_path, folder, ConfigError, needle)


def test_garbage_or_huge_config(tmp_path, llama_pair):
    folder = _copy_adapter(llama_pair / "adapter", tmp_path / "a")
    (folder / "adapter_config.json").write_bytes(b"\xff\xfe not json")
    refused(tmp_path, folder, ConfigError, "adapter_config.json", "UTF-8")


def test_weights_symlinked_out_of_the_folder(tmp_path, llama_pair):
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes((llama_pair / "adapter" / "adapter_config.json").read_bytes())
    os.symlink(llama_pair / "adapter" / "adapter_model.safetensors", folder / "adapter_model.safetensors")
    refused(tmp_path, folder, PathNotAllowedError, "adapter_model.safetensors", "outside")
