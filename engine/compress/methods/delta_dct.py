"""Delta-DCT: the delta as a JPEG-like image, data-free.

Delta-DCT (Huang et al., 2025) (a) cuts each 2-D delta into square patches, (b) ranks the
patches by importance (their L2 norm) and gives important patches more bits and the least
important none, (c) takes each patch's orthonormal 2-D DCT-II and quantises its coefficients
uniformly at the patch's bit width with one scale per patch; the rebuild dequantises and
applies the inverse DCT.

Bit allocation, two modes:

- ``"ladder"`` (the paper's scheme): bit widths ``(2c, c, 0)``; ``c = 1`` (the paper's
  2/1/0-bit mix at its "1-bit equivalent" budget) while the mean bit budget ``b`` is below 1.5,
  else ``c = round(b)``. Patches sorted by norm get ``2c`` bits (top share), ``c`` (middle)
  and 0 (bottom share); the top and bottom shares are ``split`` when the mean is exactly ``c``
  and move apart to hit any mean.
- ``"rd"`` (default; JPEG's rate-distortion optimisation, an adaptation for the zoo's dense
  deltas): every patch may take any width of ``{0, 1, 2, 3, 4, 5, 6, 8}``; the squared error of
  each patch at each width is measured, and a Lagrange multiplier trades error against bits
  (each patch picks the width minimising ``error + lambda * bits``), with ``lambda`` solved so
  the section fits. Larger patches still get more bits; the shares follow the data instead
  of a fixed ladder (no patch is dropped while bits are cheap).

Rescale (``rescale="projection"``, our adaptation, off by default): quantisation that
minimises squared error shrinks what it keeps (the rebuilt delta's component along the true
delta is ``<d, d_hat> / ||d||^2`` ~ 0.55 of it at 16x on the zoo), and a fine-tune that needs its
delta at full length then loses its task. The rebuilt delta is multiplied by
``||d||^2 / <d, d_hat>`` (one fp16 per matrix, computed exactly from the DCT coefficients by
Parseval), which restores that component and leaves the noise in other directions; measured
in bench/README.md.

With a target ratio the mean bits (ladder) or ``lambda`` (rd) is solved by bisection so the
section, scales and bit map included, fits the tensor's byte budget. Matrices whose sides are
not a multiple of the patch size are zero-padded (the padding's codes are stored and counted).

Section: u8 patch size, u8 width of the bit map, each patch's bit width (packed), the fp16
rescale factor (only with ``rescale="projection"``), one fp16 step
per patch with bits > 0 (patch order), then for each bit width in increasing order the codes of
all patches with that width (patch order, packed).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from engine.compress import bits
from engine.compress.quant import dct_matrix, dequantize, quantize_groups
from engine.compress.registry import CompressParams
from engine.errors import ArtifactError

NAME = "delta_dct"
PAPER = ("Huang et al., Seeing Delta Parameters as JPEG Images: Data-Free Delta Compression with "
         "Discrete Cosine Transform, 2025 (arXiv:2503.06676)")
SOLVED = ("mean_bits",)
MAX_C = 8
RD_WIDTHS = (0, 1, 2, 3, 4, 5, 6, 8)
STEP_BITS = 16


# Parameter sets measured in bench/README.md ("Compression quality vs ratio"): the name says
# what they are tuned for; the papers' defaults are the Params defaults.
PRESETS = {"small-models": {"rescale": "projection", "patch_size": 32}}


class Params(CompressParams):
    mean_bits: float | None = Field(None, gt=0.0, le=2 * MAX_C,
                                    description="Mean bits per delta entry (solved from --ratio).")
    patch_size: int = Field(16, ge=2, le=255, description="Side of the square patches.")
    allocation: Literal["rd", "ladder"] = Field("rd", description="Bit allocation across patches.")
    split: float = Field(0.25, ge=0.0, le=0.5,
                         description="ladder: share of patches at 2c bits (and at 0 bits) when the mean is c.")
    rescale: Literal["none", "projection"] = Field(
        "none", description="projection: scale the rebuilt delta so its component along the "
                            "true delta is not shrunk (one fp16 per matrix; our adaptation).")


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


# ---------------------------------------------------------------- rate-distortion allocation
def patch_errors(coeffs: torch.Tensor) -> np.ndarray:
    """Squared error of every patch (rows of ``coeffs``) at every width of RD_WIDTHS."""
    out = np.zeros((coeffs.shape[0], len(RD_WIDTHS)))
    out[:, 0] = (coeffs ** 2).sum(dim=1).double().cpu().numpy()
    for j, width in enumerate(RD_WIDTHS[1:], start=1):
        q, step = quantize_groups(coeffs, width)
        out[:, j] = ((dequantize(q, step, width) - coeffs) ** 2).sum(dim=1).double().cpu().numpy()
    return out


def rd_widths(errors: np.ndarray, lam: float, area: int) -> np.ndarray:
    cost = np.array([w * area + (STEP_BITS if w else 0) for w in RD_WIDTHS], dtype=np.float64)
    choice = np.argmin(errors + lam * cost[None, :], axis=1)
    return np.asarray(RD_WIDTHS)[choice]


# ---------------------------------------------------------------- sizes and layout
def map_width(widths: np.ndarray) -> int:
    return max(1, int(widths.max()).bit_length()) if widths.size else 1


def section_size(widths: np.ndarray, patch: int, extra: int = 0) -> int:
    area = patch * patch
    size = 2 + extra + bits.packed_uint_bytes(widths.size, map_width(widths)) + 2 * int((widths > 0).sum())
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


def encode(delta: torch.Tensor, budget: int | None, params: Params, ctx) -> bytes:
    patch = params.patch_size
    extra = 2 if params.rescale == "projection" else 0  # the fp16 scale
    area = patch * patch
    patches, _, _ = to_patches(delta.to(torch.float32), patch)
    C = dct_matrix(patch, delta.device)
    coeffs = (C @ patches @ C.T).reshape(patches.shape[0], area)
    norms = coeffs.norm(dim=1).double().cpu().numpy()  # = the patch's L2 norm (orthonormal DCT)
    if params.allocation == "ladder":
        def widths_for(mean: float) -> np.ndarray:
            return ladder_widths(norms, mean, params.split)
    else:
        errors = patch_errors(coeffs)
        scale = float(errors[:, 0].sum()) / max(1, coeffs.numel()) or 1.0

        def widths_for(mean: float) -> np.ndarray:  # "mean" is lambda here
            return rd_widths(errors, mean * scale, area)
    if budget is None:
        if params.allocation == "ladder":
            widths = widths_for(params.mean_bits)
        else:
            target = params.mean_bits * coeffs.numel()

            def within_mean(lam: float):
                w = widths_for(lam)
                return int((w * area).sum()) <= target, w

            widths = _solve(within_mean, 1e-9, 1e9, True)
    else:
        if budget < 2 + extra + bits.packed_uint_bytes(norms.size, 1):
            return b""
        if params.allocation == "ladder":
            widths = _solve(lambda mean: (section_size(w := widths_for(mean), patch, extra) <= budget, w),
                            0.0, 2.0 * MAX_C, False)
        else:
            widths = _solve(lambda lam: (section_size(w := widths_for(lam), patch, extra) <= budget, w),
                            1e-9, 1e9, True)
    if widths is None or not (widths > 0).any():
        return b""
    ctx.info.update(mean_bits=round(float(widths.mean()), 3), coded_patches=int((widths > 0).sum()),
                    patches=int(widths.size))
    out = bits.SectionWriter()
    out.uint(patch, 1)
    width_bits = map_width(widths)
    out.uint(width_bits, 1)
    out.raw(bits.pack_uint(widths, width_bits))
    steps = np.zeros(widths.size, dtype=np.float32)
    streams = []
    along = 0.0  # <d, d_hat>, summed in the DCT domain (orthonormal: the same number)
    for w in np.unique(widths[widths > 0]):
        idx = torch.from_numpy(np.flatnonzero(widths == w)).to(coeffs.device)
        q, step = quantize_groups(coeffs[idx], int(w))
        steps[idx.cpu().numpy()] = step.cpu().numpy()
        streams.append(bits.pack_uint(q.cpu().numpy(), int(w)))
        along += float((dequantize(q, step, int(w)) * coeffs[idx]).sum())  # steps are fp16-exact
    if extra:
        total = float((coeffs.double() ** 2).sum())
        scale = total / along if along > 0 else 1.0
        ctx.info.update(rescale=round(scale, 4))
        out.f16(np.array([scale], dtype=np.float32))
    out.f16(steps[widths > 0])
    for stream in streams:
        out.raw(stream)
    return out.getvalue()


def decode(reader: bits.SectionReader, shape, params: Params, ctx) -> torch.Tensor:
    m, n = shape
    patch = reader.uint(1)
    width_bits = reader.uint(1)
    if patch < 2 or not 1 <= width_bits <= 5:
        raise ArtifactError(f"{reader.what}: bad patch size {patch} or bit-map width {width_bits}")
    gm, gn = math.ceil(m / patch), math.ceil(n / patch)
    count, area = gm * gn, patch * patch
    widths = reader.codes(count, width_bits)
    if (widths > 16).any():
        raise ArtifactError(f"{reader.what}: a patch bit width exceeds 16")
    scale = float(reader.f16(1)[0]) if params.rescale == "projection" else 1.0
    if not math.isfinite(scale):
        raise ArtifactError(f"{reader.what}: rescale factor is not finite")
    steps = np.zeros(count, dtype=np.float32)
    steps[widths > 0] = reader.f16(int((widths > 0).sum()))
    coeffs = torch.zeros(count, area)
    for w in np.unique(widths[widths > 0]):
        idx = np.flatnonzero(widths == w)
        q = torch.from_numpy(reader.codes(idx.size * area, int(w))).reshape(idx.size, area)
        coeffs[torch.from_numpy(idx)] = dequantize(q, torch.from_numpy(steps[idx]), int(w))
    reader.done()
    C = dct_matrix(patch)
    patches = C.T @ (coeffs * scale).reshape(count, patch, patch) @ C
    return from_patches(patches, gm, gn, (m, n)).contiguous().to(ctx.device)
