"""Tiny base/fine-tune folders with known task vectors, and plain numpy float64 references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tests.io.builders import TINY_CONFIG, tiny_tensors, write_model

HIDDEN, VOCAB = 16, 40
CONFIG = {**TINY_CONFIG, "hidden_size": HIDDEN, "vocab_size": VOCAB, "intermediate_size": 2 * HIDDEN}


def base_tensors(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return tiny_tensors(dtype, seed=0, hidden=HIDDEN, vocab=VOCAB)


def finetune_tensors(base: dict[str, torch.Tensor], seed: int, scale: float = 0.05,
                     dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """base + (rank-2 part + small noise) per matrix, + noise per vector."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in base.items():
        t32 = t.float()
        if t.dim() == 2:
            m, n = t.shape
            low = torch.randn(m, 2, generator=gen) @ torch.randn(2, n, generator=gen)
            delta = scale * (low + 0.1 * torch.randn(m, n, generator=gen))
        else:
            delta = scale * torch.randn(t.shape, generator=gen)
        out[name] = (t32 + delta).to(dtype or t.dtype)
    return out


def make_family(root: Path, n_finetunes: int = 2, dtype: torch.dtype = torch.float32):
    """``(base_dir, [ft_dirs], base_tensors, [ft_tensors])`` under ``root``."""
    base = base_tensors(dtype)
    base_dir = write_model(root / "base", base, config=dict(CONFIG))
    fts, dirs = [], []
    for k in range(n_finetunes):
        ft = finetune_tensors(base, seed=100 + k)
        dirs.append(write_model(root / f"ft{k}", ft, config=dict(CONFIG)))
        fts.append(ft)
    return base_dir, dirs, base, fts


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy()


def ref_singular_values(d: np.ndarray) -> np.ndarray:
    return np.linalg.svd(d.reshape(d.shape[0], -1), compute_uv=False)


def ref_effective_rank(s: np.ndarray) -> float:
    s = s[s > 0]
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def ref_energy_k(s: np.ndarray, level: float) -> int:
    energy = np.cumsum(s ** 2) / np.sum(s ** 2)
    for k, e in enumerate(energy, start=1):
        if e >= level - 1e-12:
            return k
    return len(s)


def ref_kurtosis(x: np.ndarray) -> float:
    x = x.ravel()
    c = x - x.mean()
    m2 = np.mean(c ** 2)
    m4 = np.mean(c ** 4)
    return float(m4 / m2 ** 2 - 3.0)


def ref_topk_set(x: np.ndarray, density: float) -> set[int]:
    """Indices of the k largest |x| by a full sort (ties at the threshold included), zeros out."""
    a = np.abs(x.ravel())
    k = max(1, int(np.ceil(density * a.size)))
    threshold = np.sort(a)[::-1][k - 1]
    return {int(i) for i in np.nonzero((a >= threshold) & (a > 0))[0]}
