"""Small random inputs shared by the merge tests (float32 inputs; references cast to float64)."""

import torch

from engine.merge.common import derive_seed


def rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


def family(n=3, shape=(6, 5), seed=0, delta_scale=0.1):
    """A base and n fine-tunes of it."""
    base = rand(*shape, seed=seed)
    return base, [base + rand(*shape, seed=seed + 1 + i, scale=delta_scale) for i in range(n)]


def seeded_uniform(seed, name, shape):
    """The uniform draw a model with per-model `seed` gets for tensor `name`."""
    g = torch.Generator().manual_seed(derive_seed(seed, name))
    return torch.rand(shape, generator=g, dtype=torch.float32)
