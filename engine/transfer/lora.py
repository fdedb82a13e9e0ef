"""A minimal LoRA over a model's linears and input embedding: ``y = W x + s B A drop(x)``.

transformers has no LoRA and peft is not a runtime requirement of the workbench, so the few
lines PostPKT needs live here (peft checks them in tests). ``attach`` replaces the named modules
of a model in place; ``merged_state`` gives the plain state dict with every ``W + s B A``
folded in (the model of the target's shape that is written).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LoraLinear(nn.Module):
    """``base(x) + scale * (drop(x) @ A^T) @ B^T``; the base weight is frozen."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, scale: float,
                 dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        self.lora_a = nn.Parameter(a.clone().float())   # r x in
        self.lora_b = nn.Parameter(b.clone().float())   # out x r
        self.scale = float(scale)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * ((self.drop(x) @ self.lora_a.mT) @ self.lora_b.mT)

    def delta(self) -> torch.Tensor:
        return self.scale * (self.lora_b @ self.lora_a)


class LoraEmbedding(nn.Module):
    """``E[ids] + scale * (B A)^T[ids]`` with A: r x vocab, B: dim x r (peft's layout; the
    embedding's update is taken transposed, as a dim x vocab matrix). No dropout (peft has none
    on embeddings either)."""

    def __init__(self, base: nn.Embedding, a: torch.Tensor, b: torch.Tensor, scale: float):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        self.lora_a = nn.Parameter(a.clone().float())   # r x vocab
        self.lora_b = nn.Parameter(b.clone().float())   # dim x r
        self.scale = float(scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = nn.functional.embedding(ids, self.lora_a.mT)       # (..., r)
        return self.base(ids) + self.scale * (rows @ self.lora_b.mT)

    def delta(self) -> torch.Tensor:  # in the embedding's own (vocab x dim) layout
        return self.scale * (self.lora_b @ self.lora_a).mT


def random_init(out_features: int, in_features: int, rank: int, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's default: A Kaiming-uniform (a = sqrt 5, as nn.Linear), B = 0, so BA = 0."""
    bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on an (r, in) matrix
    a = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound
    return a, torch.zeros(out_features, rank)


def _get(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def attach(model: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float,
           dropout: float = 0.0) -> list[nn.Parameter]:
    """Wrap each module named in ``factors`` ({module name: (A, B)}) and freeze everything
    else; returns the trainable LoRA parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    trainable: list[nn.Parameter] = []
    for name, (a, b) in factors.items():
        base = _get(model, name)
        device = base.weight.device
        a, b = a.to(device), b.to(device)
        if isinstance(base, nn.Embedding):
            wrapped = LoraEmbedding(base, a, b, scale)
        elif isinstance(base, nn.Linear):
            wrapped = LoraLinear(base, a, b, scale, dropout)
        else:
            raise TypeError(f"LoRA on {name}: not a Linear or Embedding")
        _set(model, name, wrapped)
        trainable += [wrapped.lora_a, wrapped.lora_b]
    return trainable


def merged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with every LoRA folded into its base weight (``W + s B A``), named as
    the unwrapped model names it."""
    deltas = {}
    for name, module in model.named_modules():
        if isinstance(module, (LoraLinear, LoraEmbedding)):
            deltas[f"{name}.base.weight"] = (f"{name}.weight", module.delta())
    out = {}
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            continue
        if key in deltas:
            plain, delta = deltas[key]
            out[plain] = (value.float() + delta.detach().to(value.device)).to(value.dtype)
        else:
            out[key.replace(".base.", ".") if key.endswith(".base.weight") else key] = value
    return {k: v.detach() for k, v in out.items()}
