"""Random keep-masks that regenerate from a seed, independent of library versions.

A compressor that drops entries at random (DARE, ImPart) stores only a seed: the decoder must
draw the same positions years later. ``torch.randperm`` and NumPy's samplers do not promise
the same stream across releases, so positions come from our own function: every index ``i``
gets the score ``splitmix64(seed, i)`` and the ``k`` indices with the smallest scores are kept
(ties, a 2**-64 event, break by index). That is a uniformly random ``k``-subset, fully
specified here.
"""

from __future__ import annotations

import hashlib

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def derive_seed(seed: int, *parts) -> int:
    """A 63-bit seed from a seed and labels (tensor name, component, side); stable everywhere."""
    text = ":".join([str(int(seed))] + [str(p) for p in parts])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def scores(seed: int, n: int) -> np.ndarray:
    """splitmix64 of ``seed * golden + i`` for i in 0..n-1 (uint64, wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed) * _GOLDEN + np.arange(n, dtype=np.uint64) * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def keep_positions(seed: int, n: int, k: int) -> np.ndarray:
    """Sorted indices of a uniformly random ``k``-subset of ``range(n)`` drawn from ``seed``."""
    if not 0 <= k <= n:
        raise ValueError(f"cannot keep {k} of {n}")
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    if k == n:
        return np.arange(n, dtype=np.int64)
    s = scores(seed, n)
    picked = np.argpartition(s, k - 1)[:k]
    return np.sort(picked).astype(np.int64)
