"""engine.lora.adapter against the real PEFT library: base + our per-module task vector equals
PEFT's merge_and_unload(), tensor by tensor, for plain LoRA, rsLoRA with rank/alpha patterns,
LoRA on embeddings with modules_to_save, lora_bias, and GPT-2's Conv1D (fan_in_fan_out)."""

from __future__ import annotations

import pytest
import torch

from engine.io import ModelFolder
from engine.lora import LoraAdapter, is_adapter_folder
from tests.lora.peft_builders import make_adapter, tiny_gpt2, tiny_llama

CASES = {
    "llama-plain": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"])),
    "llama-rslora-patterns": ("llama", dict(
        target_modules=["q_proj", "k_proj", "embed_tokens"], modules_to_save=["lm_head"],
        use_rslora=True, rank_pattern={"layers.1.self_attn.q_proj": 2},
        alpha_pattern={"k_proj": 3}, r=8, lora_alpha=16)),
    "llama-lora-bias": ("llama", dict(target_modules=["o_proj"], lora_bias=True)),
    "gpt2-conv1d": ("gpt2", dict(target_modules=["c_attn", "c_fc", "c_proj"],
                                 fan_in_fan_out=True)),
}


def _base_and_adapter(tmp_path, case):
    arch, kwargs = CASES[case]
    if arch == "llama" and kwargs.get("lora_bias"):
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, attention_bias=True)).eval()
        model.save_pretrained(tmp_path / "base")
    else:
        model = (tiny_llama if arch == "llama" else tiny_gpt2)(tmp_path / "base")
    merged = make_adapter(model, tmp_path / "adapter", **kwargs)
    return model, merged


@pytest.mark.parametrize("case", sorted(CASES))
def test_base_plus_delta_equals_peft_merge_and_unload(tmp_path, case):
    model, merged = _base_and_adapter(tmp_path, case)
    assert is_adapter_folder(tmp_path / "adapter") and not is_adapter_folder(tmp_path / "base")
    with ModelFolder(tmp_path / "base") as base, LoraAdapter(tmp_path / "adapter") as adapter:
        adapter.check_base({n: base.info(n).shape for n in base.tensor_names}, base.path)
        changed = 0
        for name in base.tensor_names:
            b = base.get_tensor(name)
            d = adapter.delta(name, b)
            want = merged[name].float()
            got = b.float() if d is None else b.float() + d
            torch.testing.assert_close(got, want, rtol=0, atol=2e-6, msg=name)
            if d is not None:
                changed += 1
                assert not torch.equal(want, b.float()), f"{name}: the adapter changed nothing"
        assert changed == len(adapter.targets) > 0
    # every tensor PEFT changed is one we changed
    with ModelFolder(tmp_path / "base") as base:
        peft_changed = {n for n in base.tensor_names if not torch.equal(merged[n], base.get_tensor(n))}
    assert peft_changed <= set(adapter.targets)


def test_rank_and_alpha_patterns_set_each_modules_scale(tmp_path):
    _base_and_adapter(tmp_path, "llama-rslora-patterns")
    adapter = LoraAdapter(tmp_path / "adapter")
    q1 = adapter.modules["model.layers.1.self_attn.q_proj.weight"]
    q0 = adapter.modules["model.layers.0.self_attn.q_proj.weight"]
    k0 = adapter.modules["model.layers.0.self_attn.k_proj.weight"]
    assert (q1.rank, q0.rank, k0.rank) == (2, 8, 8)
    assert q1.scale == pytest.approx(16 / 2 ** 0.5)      # rsLoRA: alpha / sqrt(r)
    assert q0.scale == pytest.approx(16 / 8 ** 0.5)
    assert k0.scale == pytest.approx(3 / 8 ** 0.5)       # alpha_pattern
    embed = adapter.modules["model.embed_tokens.weight"]
    assert embed.embedding and embed.transpose
    assert "lm_head.weight" in adapter.whole


def test_adapter_finetune_reads_like_the_merged_folder(tmp_path):
    """Every engine reader sees base + adapter as PEFT's merged model, tensor by tensor."""
    from engine.lora.finetune import AdapterFinetune, open_finetune
    from engine.recipe import split_lora_ref as split_reference

    model, merged = _base_and_adapter(tmp_path, "llama-rslora-patterns")
    with ModelFolder(tmp_path / "base") as base:
        ft = open_finetune(tmp_path / "adapter", base)
        assert isinstance(ft, AdapterFinetune)
        assert ft.tensor_names == base.tensor_names and ft.config == base.config
        for name in ft.tensor_names:
            torch.testing.assert_close(ft.read_tensor(name).float(), merged[name].float(),
                                       rtol=0, atol=2e-6, msg=name)
        untouched = next(n for n in base.tensor_names if n not in ft.adapter.targets)
        assert ft.read_tensor(untouched).data_ptr() != 0 and ft.delta(untouched) is None
        prints = ft.file_fingerprints()
        assert set(prints) == {"adapter_model.safetensors", *base.file_fingerprints()}
        changed = ft.adapter.targets[0]
        assert ft.info(changed).file.name == "adapter_model.safetensors"
        assert ft.info(untouched).file == base.info(untouched).file
    assert split_reference(f"{tmp_path}/base+{tmp_path}/adapter") == (f"{tmp_path}/base",
                                                                    f"{tmp_path}/adapter")
    assert split_reference(str(tmp_path / "base")) == (str(tmp_path / "base"), None)
