"""Tiny model families for the MoE tests, built offline in the test's own folder: a base and
fine-tunes of it (every weight moved a little, each by its own seed), with the zoo's character
tokenizer saved beside the weights so prompts can be encoded."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml


def _config(kind: str, tie: bool, layers: int = 2):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    from engine.evaluate.tokenizer import VOCAB_SIZE

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[kind]
    return cls(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def build_family(root: Path, kind: str = "llama", *, tie: bool = False, experts: int = 3,
                 scale: float = 0.05, layers: int = 2) -> dict[str, Path]:
    """``{"base": folder, "e0": ..., "e1": ...}``: float32 models of one architecture."""
    from transformers import AutoModelForCausalLM

    from engine.evaluate.tokenizer import build_tokenizer

    config = _config(kind, tie, layers)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).to(torch.float32)
    state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    folders = {"base": root / "base"}
    base.save_pretrained(folders["base"])
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(folders["base"])
    for i in range(experts):
        g = torch.Generator().manual_seed(100 + i)
        model = AutoModelForCausalLM.from_config(config).to(torch.float32)
        model.load_state_dict({k: v + scale * v.abs().mean().clamp(min=1e-3)
                               * torch.randn(v.shape, generator=g) for k, v in state.items()})
        folders[f"e{i}"] = root / f"e{i}"
        model.save_pretrained(folders[f"e{i}"])
        tokenizer.save_pretrained(folders[f"e{i}"])
    return folders


PROMPTS = [["rev:abc=", "rev:hello="], ["up:abc=", "up:xy="], ["sort:cba="], ["inc:41="]]


def moe_config(folders: dict[str, Path], *, gate_mode: str = "cheap_embed", experts=None,
               shared=None, **extra) -> dict:
    """A mergekit-moe config over ``folders`` (experts ``e0``, ``e1``, ...; expert 1 also has
    negative prompts)."""
    names = experts or sorted(k for k in folders if k.startswith("e"))
    config = {"base_model": str(folders["base"]), "gate_mode": gate_mode, "dtype": "float32",
              "experts_per_token": 2, "experts": []}
    for i, name in enumerate(names):
        expert = {"source_model": str(folders[name]), "positive_prompts": PROMPTS[i % len(PROMPTS)]}
        if i == 1:
            expert["negative_prompts"] = ["rev:abc="]
        config["experts"].append(expert)
    if shared is not None:
        config["shared_experts"] = [{"source_model": str(folders[shared]),
                                     "positive_prompts": ["any:abc="]}]
    config.update(extra)
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
