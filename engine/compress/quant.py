"""Uniform quantisers and the orthonormal DCT-II shared by the compressors.

Quantiser: symmetric, mid-rise, ``b`` bits per value, one step ``delta`` per group; code ``q``
in ``0 .. 2**b - 1`` stands for ``(q - (2**b - 1) / 2) * delta``. The step is rounded to fp16
*before* the codes are chosen, so the decoder (which reads the fp16 step) rebuilds exactly
what the encoder measured. One bit gives ``±delta/2`` with ``delta/2 = mean |x|`` (the
MSE-optimal sign scale, as in BitDelta); more bits search a small grid of clipping levels
for the smallest squared error per group.
"""

from __future__ import annotations

import math

import torch

FP16_MAX = 65504.0
_CLIP_GRID = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.42, 0.35, 0.28, 0.22)


def to_fp16_exact(x: torch.Tensor) -> torch.Tensor:
    """Round to fp16 and back (float32), clamped to the fp16 range."""
    return x.clamp(-FP16_MAX, FP16_MAX).to(torch.float16).to(torch.float32)


def _codes(x: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    top = (1 << bits) - 1
    safe = torch.where(step > 0, step, torch.ones_like(step))
    q = torch.round(x / safe[:, None] + top / 2.0).clamp(0, top)
    return torch.where(step[:, None] > 0, q, torch.zeros_like(q))


def dequantize(codes: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (groups x values) and per-group steps back to float32 values."""
    top = (1 << bits) - 1
    return (codes.to(torch.float32) - top / 2.0) * step.to(torch.float32)[:, None]


def quantize_groups(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise each row of ``x`` (groups x values, float32) at ``bits`` bits.

    Returns ``(codes, step)``: int64 codes of the same shape and the fp16-exact float32 step
    of every row. A row of zeros gets step 0 (rebuilt as zeros)."""
    if bits < 1:
        raise ValueError("bits must be >= 1")
    x = x.to(torch.float32)
    if x.numel() == 0:
        return torch.zeros_like(x, dtype=torch.int64), torch.zeros(x.shape[0], device=x.device)
    if bits == 1:
        step = to_fp16_exact(2.0 * x.abs().mean(dim=1))
        return _codes(x, step, 1).to(torch.int64), step
    peak = x.abs().amax(dim=1)
    best_err = None
    best_step = torch.zeros_like(peak)
    levels = (1 << bits) / 2.0  # half the number of levels
    for clip in _CLIP_GRID:
        step = to_fp16_exact(clip * peak / (levels - 0.5))
        err = ((dequantize(_codes(x, step, bits), step, bits) - x) ** 2).sum(dim=1)
        if best_err is None:
            best_err, best_step = err, step
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_step = torch.where(better, step, best_step)
    return _codes(x, best_step, bits).to(torch.int64), best_step


def dct_matrix(size: int, device=None) -> torch.Tensor:
    """The orthonormal DCT-II matrix C (size x size): X_dct = C @ X @ C.T, X = C.T @ Y @ C."""
    n = torch.arange(size, dtype=torch.float64)
    k = n[:, None]
    mat = torch.cos(math.pi * (2 * n[None, :] + 1) * k / (2 * size)) * math.sqrt(2.0 / size)
    mat[0] /= math.sqrt(2.0)
    return mat.to(torch.float32).to(device)
