"""Delta-DCT: the delta as a JPEG-like image, data-free.

Delta-DCT (Huang et al., 2025) (a) cuts each 2-D delta into square patches, (b) ranks the
patches by importance (their L2 norm) and gives important patches more bits and the least
important none, (c) takes each patch's orthonormal 2-D DCT-II and quantises its coefficients
uniformly at the patch's bit width; the rebuild dequantises, applies the inverse DCT and
rescales the matrix. The defaults are the paper's method:

- allocation ``"ladder"``: patches sorted by norm get fixed widths by rank, ``(2c, c, 0)``
  bits for the top, middle and bottom shares; ``c = 1`` (the paper's 2/1/0-bit mix at its
  "1-bit equivalent" budget) while the mean bit budget ``b`` is below 1.5, else
  ``c = round(b)`` (our extension to other ratios). The top and bottom shares are ``split``
  (0.25) when the mean is exactly ``c`` and move apart to hit any mean.
- quantiser ``"minmax"``: each coded patch stores its range, ``lo = min`` and ``hi = max`` of
  its coefficients (fp16 each), and code ``q`` of ``b`` bits stands for
  ``lo + q (hi - lo) / (2**b - 1)`` (asymmetric, both ends are levels).
- ``zero_patches="mean"``: a 0-bit patch is rebuilt as its mean (one fp16 per such patch: the
  mean of the patch's entries that lie inside the matrix), i.e. its DCT is the DC coefficient
  ``patch * mean`` alone.
- ``rescale="mean_abs"``: after the inverse DCT the whole matrix is scaled so its mean absolute
  value equals the original delta's, ``d_hat * mean|d| / mean|d_hat|`` (one fp16 ``mean|d|``
  per matrix; ``mean|d_hat|`` is recomputed at decode).

What we could not check in the paper's text (no public code of the authors was found, and the
method section was not available to us beyond its summaries): the exact shares of the 2/1/0
ladder (we use 25/50/25 at the 1-bit budget), the bit widths used away from the 1-bit budget,
and the patch size used for each model (we default to 16).

Our adaptations, named options:

- ``allocation="rd"`` (JPEG's rate-distortion optimisation, for the zoo's dense deltas): every
  patch may take any width of ``{0, 1, 2, 3, 4, 5, 6, 8}``; the squared error of each patch at
  each width is measured, and a Lagrange multiplier trades error against bits (each patch picks
  the width minimising ``error + lambda * bits``), with ``lambda`` solved so the section fits.
- ``quantizer="mse"``: symmetric, one fp16 step per patch, clipping level searched for the
  smallest squared error (``engine.compress.quant.quantize_groups``).
- ``zero_patches="zero"``: 0-bit patches are rebuilt as zeros (nothing stored).
- ``rescale="projection"``: quantisation that minimises squared error shrinks what it keeps
  (the rebuilt delta's component along the true delta is ``<d, d_hat> / ||d||^2`` ~ 0.55 of it
  at 16x on the zoo); the rebuilt delta is multiplied by ``||d||^2 / <d, d_hat>`` (one fp16 per
  matrix, computed exactly from the DCT coefficients by Parseval), which restores that
  component and leaves the noise in other directions. ``rescale="none"``: no rescale.

With a target ratio the mean bits (ladder) or ``lambda`` (rd) is solved by bisection so the
section, per-patch values and bit map included, fits the tensor's byte budget. Matrices whose
sides are not a multiple of the patch size are zero-padded (the padding's codes are stored and
counted).

Section: u8 patch size; u8 holding the width of the bit map (low 3 bits) and the format flags
(``FLAG_*``, high bits); each patch's bit width (packed); the fp16 ``mean|d|`` (mean_abs) or
rescale factor (projection), if any; for each patch with bits > 0 in patch order its fp16
``(lo, hi)`` (minmax) or its fp16 step (mse); for each 0-bit patch its fp16 mean (mean); then
for each bit width in increasing order the codes of all patches with that width (patch order,
packed). Sections written before the flags existed (flag bits clear) are read as the mse
quantiser with zero patches, rescaled by the stored factor when the parameters say projection.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from engine.compress import bits
from engine.compress.quant import (dct_matrix, dequantize, dequantize_minmax, quantize_groups, quantize_minmax,
                                  to_fp16_exact)
from engine.compress.registry import CompressParams
from engine.errors import ArtifactError

NAME = "delta_dct"
PAPER = ("Huang et al., Seeing Delta Parameters as JPEG Images: Data-Free Delta Compression with "
         "Discrete Cosine Transform, 2025 (arXiv:2503.06676)")
SOLVED = ("mean_bits",)
MAX_C = 8
RD_WIDTHS = (0, 1, 2, 3, 4, 5, 6, 8)
FP16_BITS = 16

FLAG_FORMAT = 0x80  # the flags below describe the section (absent: the first format)
FLAG_MINMAX = 0x40
FLAG_MEAN = 0x20
FLAG_MEAN_ABS = 0x10
FLAG_PROJECTION = 0x08
WIDTH_MASK = 0x07


# Parameter sets measured in bench/README.md ("Compression quality vs ratio"): the name says
# what they are tuned for; the papers' defaults are the Params defaults. small-models names the
# options it was measured with (our adaptations throughout).
PRESETS = {"small-models": {"allocation": "rd", "quantizer": "mse", "zero_patches": "zero",
                            "rescale": "projection", "patch_size": 32}}


class Params(CompressParams):
    mean_bits: float | None = Field(None, gt=0.0, le=2 * MAX_C,
                                    description="Mean bits per delta entry (solved from --ratio).")
    patch_size: int = Field(16, ge=2, le=255, description="Side of the square patches.")
    allocation: Literal["ladder", "rd"] = Field(
        "ladder", description="ladder: fixed widths (2c, c, 0) by norm rank (the paper's); "
                              "rd: rate-distortion choice per patch (our adaptation).")
    split: float = Field(0.25, ge=0.0, le=0.5,
                         description="ladder: share of patches at 2c bits (and at 0 bits) when the mean is c.")
    quantizer: Literal["minmax", "mse"] = Field(
        "minmax", description="minmax: each patch's range (fp16 min and max, the paper's); "
                              "mse: symmetric, one step, clipping searched (our adaptation).")
    zero_patches: Literal["mean", "zero"] = Field(
        "mean", description="mean: a 0-bit patch is rebuilt as its mean (one fp16, the paper's); "
                            "zero: rebuilt as zeros (our adaptation).")
    rescale: Literal["mean_abs", "none", "projection"] = Field(
        "mean_abs", description="mean_abs: scale the rebuilt matrix to the delta's mean |d| (one "
                                "fp16, the paper's); projection: scale its component along the "
                                "true delta to full length (our adaptation); none.")


def _flags(params: Params) -> int:
    flags = FLAG_FORMAT
    flags |= FLAG_MINMAX if params.quantizer == "minmax" else 0
    flags |= FLAG_MEAN if params.zero_patches == "mean" else 0
    flags |= {"mean_abs": FLAG_MEAN_ABS, "projection": FLAG_PROJECTION}.get(params.rescale, 0)
    return flags


def _patch_value_bytes(flags: int) -> tuple[int, int]:
    """Bytes stored per coded patch and per 0-bit patch."""
    return (4 if flags & FLAG_MINMAX else 2), (2 if flags & FLAG_MEAN else 0)


# ---------------------------------------------------------------- ladder allocation
def bit_levels(mean_bits: float) -> int:
    return 1 if mean_bits < 1.5 else min(MAX_C, int(round(mean_bits)))


def fractions(mean_bits: float, c: int, split: float) -> tuple[float, float, float]:
    """Shares of patches at (2c, c, 0) bits with mean ``mean_bits``."""
    u = min(2.0, mean_bits / c)
    if u <= 1.0:
        top = min(split, u / 2)
        mid = u - 2 * top
        return top, mid, 1.0 - top - mid
    zero = min(split, (2 - u) / 2)
    top = u - 1 + zero
    return top, 1.0 - top - zero, zero


def ladder_widths(norms: np.ndarray, mean_bits: float, split: float) -> np.ndarray:
    c = bit_levels(mean_bits)
    top, mid, _ = fractions(mean_bits, c, split)
    count = norms.size
    n_top = int(round(top * count))
    n_mid = int(round((top + mid) * count)) - n_top
    order = np.argsort(-norms, kind="stable")
    widths = np.zeros(count, dtype=np.int64)
    widths[order[:n_top]] = 2 * c
    widths[order[n_top:n_top + n_mid]] = c
    return widths


# ---------------------------------------------------------------- quantising patches
def _quantise(coeffs: torch.Tensor, width: int, minmax: bool):
    """(codes, stored fp16 values per patch as [patches, k], dequantised coefficients)."""
    if minmax:
        q, lo, hi = quantize_minmax(coeffs, width)
        return q, torch.stack([lo, hi], dim=1), dequantize_minmax(q, lo, hi, width)
    q, step = quantize_groups(coeffs, width)
    return q, step[:, None], dequantize(q, step, width)


def _zero_rebuild(coeffs: torch.Tensor, means: torch.Tensor | None, patch: int) -> torch.Tensor:
    """DCT coefficients of the 0-bit rebuild: the DC term ``patch * mean`` alone, or zeros."""
    out = torch.zeros_like(coeffs)
    if means is not None:
        out[:, 0] = means * patch
    return out


# ---------------------------------------------------------------- rate-distortion allocation
def patch_errors(coeffs: torch.Tensor, minmax: bool, zero_dc: torch.Tensor) -> np.ndarray:
    """Squared error of every patch (rows of ``coeffs``) at every width of RD_WIDTHS."""
    out = np.zeros((coeffs.shape[0], len(RD_WIDTHS)))
    out[:, 0] = ((zero_dc - coeffs) ** 2).sum(dim=1).double().cpu().numpy()
    for j, width in enumerate(RD_WIDTHS[1:], start=1):
        rebuilt = _quantise(coeffs, width, minmax)[2]
        out[:, j] = ((rebuilt - coeffs) ** 2).sum(dim=1).double().cpu().numpy()
    return out


def rd_widths(errors: np.ndarray, lam: float, area: int, coded_bits: int, zero_bits: int) -> np.ndarray:
    cost = np.array([w * area + coded_bits if w else zero_bits for w in RD_WIDTHS], dtype=np.float64)
    choice = np.argmin(errors + lam * cost[None, :], axis=1)
    return np.asarray(RD_WIDTHS)[choice]


# ---------------------------------------------------------------- sizes and layout
def map_width(widths: np.ndarray) -> int:
    return max(1, int(widths.max()).bit_length()) if widths.size else 1


def section_size(widths: np.ndarray, patch: int, flags: int) -> int:
    area = patch * patch
    per_coded, per_zero = _patch_value_bytes(flags)
    extra = 2 if flags & (FLAG_MEAN_ABS | FLAG_PROJECTION) else 0
    coded = int((widths > 0).sum())
    size = 2 + extra + bits.packed_uint_bytes(widths.size, map_width(widths))
    size += per_coded * coded + per_zero * (widths.size - coded)
    for w in np.unique(widths[widths > 0]):
        size += bits.packed_uint_bytes(int((widths == w).sum()) * area, int(w))
    return size


def to_patches(delta: torch.Tensor, patch: int) -> tuple[torch.Tensor, int, int]:
    """(patches [P, patch, patch] in row-major grid order, grid rows, grid cols)."""
    m, n = delta.shape
    gm, gn = math.ceil(m / patch), math.ceil(n / patch)
    padded = torch.zeros(gm * patch, gn * patch, device=delta.device)
    padded[:m, :n] = delta
    grid = padded.reshape(gm, patch, gn, patch).permute(0, 2, 1, 3).reshape(gm * gn, patch, patch)
    return grid, gm, gn


def from_patches(patches: torch.Tensor, gm: int, gn: int, shape) -> torch.Tensor:
    patch = patches.shape[-1]
    full = patches.reshape(gm, gn, patch, patch).permute(0, 2, 1, 3).reshape(gm * patch, gn * patch)
    return full[:shape[0], :shape[1]]


def patch_means(delta: torch.Tensor, patch: int) -> torch.Tensor:
    """Mean of each patch over its entries inside the matrix (padding excluded)."""
    sums = to_patches(delta, patch)[0].sum(dim=(1, 2))
    counts = to_patches(torch.ones_like(delta), patch)[0].sum(dim=(1, 2))
    return sums / counts


def _solve(fits, lo: float, hi: float, larger_is_smaller: bool, iters: int = 50):
    """Bisection for the parameter value with the most bits that still fits."""
    best = None
    for _ in range(iters):
        mid = 0.5 * (lo + hi) if not larger_is_smaller else math.sqrt(lo * hi)
        ok, value = fits(mid)
        if ok:
            best = value
            if larger_is_smaller:
                hi = mid
            else:
                lo = mid
        else:
            if larger_is_smaller:
                lo = mid
            else:
                hi = mid
    return best


def _allocate(coeffs, norms, zero_dc, budget, params, flags) -> np.ndarray | None:
    patch = params.patch_size
    area = patch * patch
    if params.allocation == "ladder":
        def widths_for(mean: float) -> np.ndarray:
            return ladder_widths(norms, mean, params.split)
    else:
        errors = patch_errors(coeffs, bool(flags & FLAG_MINMAX), zero_dc)
        scale = float(((coeffs - zero_dc).double() ** 2).sum()) / max(1, coeffs.numel()) or 1.0
        per_coded, per_zero = _patch_value_bytes(flags)

        def widths_for(lam: float) -> np.ndarray:
            return rd_widths(errors, lam * scale, area, 8 * per_coded, 8 * per_zero)
    if budget is None:
        if params.allocation == "ladder":
            return widths_for(params.mean_bits)
        target = params.mean_bits * coeffs.numel()
        return _solve(lambda lam: (int(((w := widths_for(lam)) * area).sum()) <= target, w), 1e-9, 1e9, True)
    if budget < section_size(np.zeros(norms.size, dtype=np.int64), patch, flags):
        return None
    if params.allocation == "ladder":
        return _solve(lambda mean: (section_size(w := widths_for(mean), patch, flags) <= budget, w),
                      0.0, 2.0 * MAX_C, False)
    return _solve(lambda lam: (section_size(w := widths_for(lam), patch, flags) <= budget, w), 1e-9, 1e9, True)


def encode(delta: torch.Tensor, budget: int | None, params: Params, ctx) -> bytes:
    patch = params.patch_size
    flags = _flags(params)
    minmax = bool(flags & FLAG_MINMAX)
    delta = delta.to(torch.float32)
    area = patch * patch
    patches, _, _ = to_patches(delta, patch)
    C = dct_matrix(patch, delta.device)
    coeffs = (C @ patches @ C.T).reshape(patches.shape[0], area)
    norms = coeffs.norm(dim=1).double().cpu().numpy()  # = the patch's L2 norm (orthonormal DCT)
    means = to_fp16_exact(patch_means(delta, patch)) if flags & FLAG_MEAN else None
    zero_dc = _zero_rebuild(coeffs, means, patch)
    widths = _allocate(coeffs, norms, zero_dc, budget, params, flags)
    if widths is None or not ((widths > 0).any() or flags & FLAG_MEAN):
        return b""
    ctx.info.update(mean_bits=round(float(widths.mean()), 3), coded_patches=int((widths > 0).sum()),
                    patches=int(widths.size))
    out = bits.SectionWriter()
    out.uint(patch, 1)
    width_bits = map_width(widths)
    out.uint(flags | width_bits, 1)
    out.raw(bits.pack_uint(widths, width_bits))
    stored = torch.zeros(widths.size, 2 if minmax else 1, device=coeffs.device)
    rebuilt = zero_dc.clone()
    streams = []
    for w in np.unique(widths[widths > 0]):
        idx = torch.from_numpy(np.flatnonzero(widths == w)).to(coeffs.device)
        q, values, dequantised = _quantise(coeffs[idx], int(w), minmax)
        stored[idx] = values
        rebuilt[idx] = dequantised
        streams.append(bits.pack_uint(q.cpu().numpy(), int(w)))
    if flags & FLAG_MEAN_ABS:
        out.f16(np.array([float(delta.abs().mean())], dtype=np.float32))
    elif flags & FLAG_PROJECTION:
        along = float((rebuilt.double() * coeffs.double()).sum())  # <d, d_hat>: orthonormal DCT
        total = float((coeffs.double() ** 2).sum())
        factor = total / along if along > 0 else 1.0
        ctx.info.update(rescale=round(factor, 4))
        out.f16(np.array([factor], dtype=np.float32))
    coded = torch.from_numpy(widths > 0).to(coeffs.device)
    out.f16(stored[coded].reshape(-1).cpu().numpy())
    if means is not None:
        out.f16(means[~coded].cpu().numpy())
    for stream in streams:
        out.raw(stream)
    return out.getvalue()


def decode(reader: bits.SectionReader, shape, params: Params, ctx) -> torch.Tensor:
    m, n = shape
    patch = reader.uint(1)
    head = reader.uint(1)
    if head & FLAG_FORMAT:
        flags, width_bits = head & ~WIDTH_MASK, head & WIDTH_MASK
    else:  # the first format: mse steps, zero patches, the factor when the parameters say so
        flags, width_bits = (FLAG_PROJECTION if params.rescale == "projection" else 0), head
    if flags & FLAG_MEAN_ABS and flags & FLAG_PROJECTION:
        raise ArtifactError(f"{reader.what}: flags name two rescales")
    if patch < 2 or not 1 <= width_bits <= 5:
        raise ArtifactError(f"{reader.what}: bad patch size {patch} or bit-map width {width_bits}")
    gm, gn = math.ceil(m / patch), math.ceil(n / patch)
    count, area = gm * gn, patch * patch
    widths = reader.codes(count, width_bits)
    if (widths > 16).any():
        raise ArtifactError(f"{reader.what}: a patch bit width exceeds 16")
    value = float(reader.f16(1)[0]) if flags & (FLAG_MEAN_ABS | FLAG_PROJECTION) else 1.0
    if not math.isfinite(value):
        raise ArtifactError(f"{reader.what}: rescale value is not finite")
    coded = widths > 0
    minmax = bool(flags & FLAG_MINMAX)
    stored = np.zeros((count, 2 if minmax else 1), dtype=np.float32)
    stored[coded] = reader.f16(int(coded.sum()) * stored.shape[1]).reshape(-1, stored.shape[1])
    coeffs = torch.zeros(count, area)
    if flags & FLAG_MEAN:
        means = torch.from_numpy(reader.f16(int((~coded).sum())))
        coeffs[torch.from_numpy(~coded), 0] = means * patch
    for w in np.unique(widths[coded]):
        idx = np.flatnonzero(widths == w)
        q = torch.from_numpy(reader.codes(idx.size * area, int(w))).reshape(idx.size, area)
        values = torch.from_numpy(stored[idx])
        if minmax:
            coeffs[torch.from_numpy(idx)] = dequantize_minmax(q, values[:, 0], values[:, 1], int(w))
        else:
            coeffs[torch.from_numpy(idx)] = dequantize(q, values[:, 0], int(w))
    reader.done()
    if not torch.isfinite(coeffs).all():
        raise ArtifactError(f"{reader.what}: a stored patch value is not finite")
    C = dct_matrix(patch)
    out = from_patches(C.T @ coeffs.reshape(count, patch, patch) @ C, gm, gn, (m, n))
    if flags & FLAG_PROJECTION:
        out = out * value
    elif flags & FLAG_MEAN_ABS:
        rebuilt_mean = float(out.abs().mean())
        if rebuilt_mean > 0:
            out = out * (value / rebuilt_mean)
    return out.contiguous().to(ctx.device)
