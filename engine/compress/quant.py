"""Uniform quantisers and the orthonormal DCT-II shared by the compressors.

Three quantisers, each with one set of parameters per group (a row of the input), ``b`` bits
per value, codes ``q`` in ``0 .. top`` with ``top = 2**b - 1``. Every stored parameter is
rounded to fp16 *before* the codes are chosen, so the decoder (which reads the fp16 values)
rebuilds exactly what the encoder measured.

- ``quantize_groups`` (symmetric, mid-rise, our MSE-clipped variant): one step ``delta``;
  ``q`` stands for ``(q - top / 2) * delta``. One bit gives ``±delta/2`` with
  ``delta/2 = mean |x|`` (the MSE-optimal sign scale, as in BitDelta); more bits search a small
  grid of clipping levels for the smallest squared error per group.
- ``quantize_minmax`` (asymmetric min-max, as Delta-DCT stores each patch's range): the group's
  ``lo = min x`` and ``hi = max x``; ``q`` stands for ``lo + q (hi - lo) / top``. Both ends
  are levels, nothing is clipped.
- ``quantize_zero_point`` (asymmetric with an integer zero-point, GPTQ's quantiser as
  Delta-CoMe runs it without ``--sym``): the range is widened to hold 0,
  ``[min(min x, 0), max(max x, 0)]``; ``scale = range / top``, ``zero = round(-min / scale)``
  (an integer in ``0 .. top``, stored in ``b`` bits); ``q`` stands for ``scale (q - zero)``, so
  0 is always a level. An all-zero group gets GPTQ's range ``[-1, 1]`` (rebuilt as zeros).
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


def quantize_minmax(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row min-max quantisation of ``x`` (groups x values) at ``bits`` bits.

    Returns ``(codes, lo, hi)``: int64 codes and the fp16-exact float32 ends of every row. A
    constant row has ``lo == hi`` and codes 0 (rebuilt as the constant)."""
    if bits < 1:
        raise ValueError("bits must be >= 1")
    x = x.to(torch.float32)
    if x.numel() == 0:
        empty = torch.zeros(x.shape[0], device=x.device)
        return torch.zeros_like(x, dtype=torch.int64), empty, empty.clone()
    lo = to_fp16_exact(x.amin(dim=1))
    hi = to_fp16_exact(x.amax(dim=1))
    top = (1 << bits) - 1
    width = hi - lo
    safe = torch.where(width > 0, width, torch.ones_like(width))
    q = torch.round((x - lo[:, None]) / safe[:, None] * top).clamp(0, top)
    q = torch.where(width[:, None] > 0, q, torch.zeros_like(q))
    return q.to(torch.int64), lo, hi


def dequantize_minmax(codes: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    top = (1 << bits) - 1
    lo = lo.to(torch.float32)[:, None]
    return lo + codes.to(torch.float32) * ((hi.to(torch.float32)[:, None] - lo) / top)


def quantize_zero_point(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ's asymmetric round-to-nearest of each row of ``x`` at ``bits`` bits.

    Returns ``(codes, scale, zero)``: int64 codes, the fp16-exact float32 scale and the int64
    zero-point (``0 .. 2**bits - 1``) of every row."""
    if bits < 1:
        raise ValueError("bits must be >= 1")
    x = x.to(torch.float32)
    top = (1 << bits) - 1
    zeros = torch.zeros(x.shape[0], device=x.device)
    if x.numel() == 0:
        return torch.zeros_like(x, dtype=torch.int64), zeros, zeros.to(torch.int64)
    xmin = torch.minimum(x.amin(dim=1), zeros)
    xmax = torch.maximum(x.amax(dim=1), zeros)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = to_fp16_exact((xmax - xmin) / top)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # fp16 underflow: all codes = zero
    zero = torch.round(-xmin / safe).clamp(0, top)
    q = (torch.round(x / safe[:, None]) + zero[:, None]).clamp(0, top)
    q = torch.where(scale[:, None] > 0, q, zero[:, None].expand_as(q))
    return q.to(torch.int64), scale, zero.to(torch.int64)


def dequantize_zero_point(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (codes - zero[:, None]).to(torch.float32) * scale.to(torch.float32)[:, None]


def dct_matrix(size: int, device=None) -> torch.Tensor:
    """The orthonormal DCT-II matrix C (size x size): X_dct = C @ X @ C.T, X = C.T @ Y @ C."""
    n = torch.arange(size, dtype=torch.float64)
    k = n[:, None]
    mat = torch.cos(math.pi * (2 * n[None, :] + 1) * k / (2 * size)) * math.sqrt(2.0 / size)
    mat[0] /= math.sqrt(2.0)
    return mat.to(torch.float32).to(device)
