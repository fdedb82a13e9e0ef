"""Synthetic base/fine-tune folders with realistic-size matrices for the compression tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engine.io import ModelWriter

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
          "intermediate_size": 512, "num_hidden_layers": 1, "num_attention_heads": 4,
          "num_key_value_heads": 4, "vocab_size": 384, "tie_word_embeddings": False}
SHAPES = {
    "model.embed_tokens.weight": (384, 256),
    "model.layers.0.self_attn.q_proj.weight": (256, 256),
    "model.layers.0.mlp.up_proj.weight": (512, 256),
    "model.layers.0.input_layernorm.weight": (256,),
    "model.norm.weight": (256,),
}


def low_rank_plus_noise(shape, seed: int, rank: int = 8, noise: float = 0.15) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    a = torch.randn(m, rank, generator=g) / rank ** 0.5
    b = torch.randn(rank, n, generator=g) / n ** 0.5
    spectrum = torch.logspace(0, -1, rank)[None, :]
    return 1e-2 * ((a * spectrum) @ b * n ** 0.5 / 4 + noise * torch.randn(m, n, generator=g))


def make_pair(root: Path, seed: int = 0, config: dict | None = None) -> tuple[Path, Path, dict, dict]:
    """(base folder, fine-tune folder, base tensors, fine-tune tensors) under ``root``."""
    g = torch.Generator().manual_seed(seed)
    base, ft = {}, {}
    for i, (name, shape) in enumerate(SHAPES.items()):
        base[name] = torch.randn(*shape, generator=g) * 0.05
        if len(shape) == 2:
            ft[name] = base[name] + low_rank_plus_noise(shape, seed * 100 + i)
        else:
            ft[name] = base[name] + 1e-3 * torch.randn(*shape, generator=g)
    paths = []
    for label, tensors in (("base", base), ("ft", ft)):
        folder = root / label
        with ModelWriter(folder, config=dict(config or CONFIG),
                         extra_files={"tokenizer_config.json": {"model_max_length": 64}}) as w:
            for name, t in tensors.items():
                w.add_tensor(name, t)
        paths.append(folder)
    return paths[0], paths[1], base, ft


def matrices(tensors: dict) -> dict:
    return {n: t for n, t in tensors.items() if t.ndim == 2}


def rel_err(approx: dict, exact: dict, base: dict) -> float:
    num = sum(float(((approx[n].double() - exact[n].double()) ** 2).sum()) for n in exact)
    den = sum(float(((exact[n].double() - base[n].double()) ** 2).sum()) for n in exact)
    return num / den


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def fp16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float64)
