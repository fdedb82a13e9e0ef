"""Tiny base models and real PEFT adapters of them, built in the test's own folder."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_llama(folder: Path, seed: int = 0, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                      max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    return model


def tiny_gpt2(folder: Path, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32,
                     bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(folder)
    return model


def make_adapter(model, folder: Path, seed: int = 1, **lora_kwargs):
    """A PEFT LoRA adapter of ``model`` with random (non-zero) A and B, saved to ``folder``;
    returns PEFT's ``merge_and_unload()`` state dict of the same adapter (the reference)."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    kwargs = dict(r=4, lora_alpha=8, init_lora_weights=False)
    kwargs.update(lora_kwargs)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(**kwargs))
    with torch.no_grad():  # lora_bias and B start at zero in some versions: make them count
        for name, param in peft_model.named_parameters():
            if "lora_" in name and param.abs().sum() == 0:
                param.normal_(0, 0.1)
            if "modules_to_save" in name:  # a trained copy differs from the base
                param.add_(torch.randn_like(param), alpha=0.01)
    peft_model.save_pretrained(folder)
    merged = peft_model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def save_merged(model, merged_state: dict, folder: Path) -> Path:
    """PEFT's merged weights saved as a full model folder (the reference a LoRA path is held to)."""
    import copy

    full = copy.deepcopy(model)
    full.load_state_dict(merged_state)
    full.save_pretrained(folder)
    return folder


def user_folder(quick_zoo: Path, mine: Path, n_examples: int) -> Path:
    """A user's own folder: a copy of the zoo's small base (outside the zoo), two LoRA adapters
    of it and a JSONL file of ``n_examples`` upper-task lines."""
    import json
    import shutil

    from engine.evaluate.loading import load_model_folder
    from engine.evaluate.tasks import TASKS, heldout_examples

    shutil.copytree(quick_zoo / "small" / "base", mine / "base")
    model, _ = load_model_folder(mine / "base")
    make_adapter(model, mine / "adapter_a", seed=1, target_modules=["q_proj"], r=2, lora_alpha=1)
    make_adapter(model, mine / "adapter_b", seed=2, target_modules=["v_proj"], r=2, lora_alpha=1)
    examples = heldout_examples(TASKS["upper"], n_examples)
    (mine / "qa.jsonl").write_text("\n".join(json.dumps({"prompt": p, "answer": a})
                                             for p, a in examples) + "\n")
    return mine
