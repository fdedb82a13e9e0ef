"""Delta-CoMe: SVD of the delta, singular vectors in long-tail mixed precision.

Delta-CoMe (Ping et al.) keeps the singular vectors of the largest singular values at high
precision and the long tail at low precision: its released configuration quantises the top 2
singular vector pairs at 8 bits, the next 32 at 3 bits and the next ones at 2 bits (968 of
4096 for attention, 1428 for MLP at the 1-bit-per-entry budget), and drops the rest. Vectors
are quantised in groups of 128 values with one scale per group.

Choices here: the schedule is ``(8 bits x n8, 3 bits x n3, 2 bits x rest)`` with the paper's
``n8 = 2`` and ``n3 = 32``; with a target ratio the number of 2-bit pairs is what the budget
pays for (and if it cannot pay for the 8- and 3-bit pairs, those shrink first: 3-bit pairs,
then 8-bit pairs). Quantiser (``quantizer``):

- ``"zero_point"`` (default): GPTQ's asymmetric quantiser as the authors run it (their
  ``run.sh`` does not pass ``--sym``): per group the range ``[min(min x, 0), max(max x, 0)]``,
  an fp16 scale and an integer zero-point (stored in the group's bit width, as GPTQ packs
  them), levels ``scale (q - zero)`` (``engine.compress.quant.quantize_zero_point``).
- ``"symmetric"`` (our earlier default, kept as an option): one fp16 step per group, clipping
  level searched for the smallest squared error (``engine.compress.quant.quantize_groups``).

Not done: GPTQ itself. The authors quantise with GPTQ on C4 calibration activations (128
samples, act-order, true-sequential): ``V`` with the layer's input activations, then ``U`` with
the activations projected by ``S V^T``, each as a weight matrix with groups of 128 along its
input dimension (so ``U``'s groups run across singular vectors, one scale per row of ``U``
per group). Here the rounding is to nearest (GPTQ's data-free special case, no error
feedback), every singular vector is split into its own groups (``U`` and ``V`` alike), and
``sigma_i`` is folded into ``u_i`` (each group has its own scale, so the scale is free). On the
zoo's tiny matrices (rank <= 64) the 32 3-bit pairs are half the rank or more.

Section: three counts, then for each tier U's columns (m values each) and V's columns (n
values each), group by group: fp16 scales, the packed zero-points (zero_point only), then
the packed codes. The two quantisers' sections differ in length for the same counts (the
zero-points), which is how the decoder tells them apart.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from engine.compress import bits
from engine.compress.methods.svd import svd
from engine.compress.quant import dequantize, dequantize_zero_point, quantize_groups, quantize_zero_point
from engine.compress.registry import CompressParams
from engine.errors import ArtifactError

NAME = "delta_come"
PAPER = ("Ping et al., Delta-CoMe: Training-Free Delta-Compression with Mixed-Precision for Large "
         "Language Models, NeurIPS 2024 (arXiv:2406.08903)")
SOLVED = ("n2",)
BITS = (8, 3, 2)


# Parameter sets measured in bench/README.md: groups of 32 for singular vectors 128-320 long.
PRESETS = {"small-models": {"group_size": 32}}


class Params(CompressParams):
    n8: int = Field(2, ge=0, description="Singular vector pairs at 8 bits (paper: 2).")
    n3: int = Field(32, ge=0, description="Pairs at 3 bits after them (paper: 32).")
    n2: int | None = Field(None, ge=0, description="Pairs at 2 bits after them (solved from --ratio).")
    group_size: int = Field(128, ge=8, description="Values per quantisation group (paper: 128).")
    quantizer: Literal["zero_point", "symmetric"] = Field(
        "zero_point", description="zero_point: GPTQ's asymmetric groups (fp16 scale, integer zero-point; "
                                  "the authors'); symmetric: one step per group, clipping searched (ours).")
    correct: bool = Field(False, description="Quantise V first, refit U to the delta by least squares "
                                             "given the quantised V, then quantise U (same format).")


def _block_bytes(count: int, length: int, nbits: int, group: int, zero_point: bool) -> int:
    """Exact bytes of ``count`` vectors of ``length`` values quantised in one block."""
    groups = count * math.ceil(length / group)
    size = 2 * groups + bits.packed_uint_bytes(count * length, nbits)
    return size + (bits.packed_uint_bytes(groups, nbits) if zero_point else 0)


def _vector_bytes(length: int, nbits: int, group: int, zero_point: bool = True) -> int:
    """An upper bound of one vector's share of a block (blocks pack their codes together)."""
    return _block_bytes(1, length, nbits, group, zero_point)


def section_size(m: int, n: int, counts: tuple[int, int, int], group: int, cw: int,
                 zero_point: bool = True) -> int:
    size = 3 * cw
    for count, nbits in zip(counts, BITS):
        size += count * (_vector_bytes(m, nbits, group, zero_point) + _vector_bytes(n, nbits, group, zero_point))
    return size


def exact_size(m: int, n: int, counts, group: int, cw: int, zero_point: bool) -> int:
    size = 3 * cw
    for count, nbits in zip(counts, BITS):
        if count:
            size += _block_bytes(count, m, nbits, group, zero_point) + _block_bytes(count, n, nbits, group, zero_point)
    return size


def schedule(m: int, n: int, budget: int, params: Params) -> tuple[int, int, int]:
    """Counts (n8, n3, n2) that fit ``budget``: the paper's head, then as many 2-bit as fit."""
    rank = min(m, n)
    cw = bits.count_width(rank)
    g = params.group_size
    zp = params.quantizer == "zero_point"
    n8 = min(params.n8, rank)
    n3 = min(params.n3, rank - n8)
    while section_size(m, n, (n8, n3, 0), g, cw, zp) > budget and n3 > 0:
        n3 -= 1
    while section_size(m, n, (n8, n3, 0), g, cw, zp) > budget and n8 > 0:
        n8 -= 1
    pair2 = _vector_bytes(m, 2, g, zp) + _vector_bytes(n, 2, g, zp)
    spare = budget - section_size(m, n, (n8, n3, 0), g, cw, zp)
    n2 = max(0, min(rank - n8 - n3, spare // pair2)) if spare > 0 else 0
    return n8, n3, n2


def _quantize_vectors(vectors: torch.Tensor, nbits: int, group: int, out: bits.SectionWriter,
                      zero_point: bool) -> torch.Tensor:
    """vectors: (count, length); each vector split into groups of ``group`` values (the last
    one zero-padded; the padding is not stored). Writes the scales, zero-points and codes;
    returns the dequantised vectors."""
    count, length = vectors.shape
    padded = math.ceil(length / group) * group
    grid = torch.zeros(count, padded, device=vectors.device)
    grid[:, :length] = vectors
    if zero_point:
        codes, scale, zero = quantize_zero_point(grid.reshape(-1, group), nbits)
        values = dequantize_zero_point(codes, scale, zero)
    else:
        codes, scale = quantize_groups(grid.reshape(-1, group), nbits)
        values = dequantize(codes, scale, nbits)
    out.f16(scale.cpu().numpy())
    if zero_point:
        out.raw(bits.pack_uint(zero.cpu().numpy(), nbits))
    out.raw(bits.pack_uint(codes.reshape(count, padded)[:, :length].cpu().numpy(), nbits))
    return values.reshape(count, padded)[:, :length]


def _dequantize_vectors(reader: bits.SectionReader, count: int, length: int, nbits: int,
                        group: int, zero_point: bool) -> torch.Tensor:
    groups = math.ceil(length / group)
    scale = torch.from_numpy(reader.f16(count * groups))
    zero = torch.from_numpy(reader.codes(count * groups, nbits)) if zero_point else None
    codes = torch.from_numpy(reader.codes(count * length, nbits)).reshape(count, length)
    padded = torch.zeros(count, groups * group, dtype=torch.int64)
    padded[:, :length] = codes
    grid = padded.reshape(-1, group)
    values = dequantize_zero_point(grid, scale, zero) if zero_point else dequantize(grid, scale, nbits)
    return values.reshape(count, groups * group)[:, :length]


def encode(delta: torch.Tensor, budget: int | None, params: Params, ctx) -> bytes:
    m, n = delta.shape
    rank = min(m, n)
    cw = bits.count_width(rank)
    if budget is None:
        n8 = min(params.n8, rank)
        n3 = min(params.n3, rank - n8)
        counts = (n8, n3, min(params.n2, rank - n8 - n3))
    else:
        counts = schedule(m, n, budget, params)
    if sum(counts) == 0:
        return b""
    u, s, vh = svd(delta)
    zp = params.quantizer == "zero_point"
    ctx.info.update(n8=counts[0], n3=counts[1], n2=counts[2])
    r = sum(counts)
    us, v = u[:, :r] * s[:r], vh[:r].T.contiguous()
    v_parts, start = [], 0
    for count, nbits in zip(counts, BITS):
        if count:
            v_parts.append(bits.SectionWriter())
            v_hat = _quantize_vectors(v[:, start:start + count].T.contiguous(), nbits, params.group_size,
                                      v_parts[-1], zp)
            if params.correct:
                v[:, start:start + count] = v_hat.T
        start += count
    if params.correct:  # refit U to the delta given the quantised V (least squares)
        gram = v.T @ v + 1e-12 * torch.eye(r, device=v.device)
        us = torch.linalg.solve(gram, (delta.to(torch.float32) @ v).T).T
    out = bits.SectionWriter()
    for c in counts:
        out.uint(c, cw)
    start, part = 0, 0
    for count, nbits in zip(counts, BITS):
        if count:
            _quantize_vectors(us[:, start:start + count].T.contiguous(), nbits, params.group_size, out, zp)
            out.raw(v_parts[part].getvalue())
            part += 1
        start += count
    return out.getvalue()


def decode(reader: bits.SectionReader, shape, params: Params, ctx) -> torch.Tensor:
    m, n = shape
    rank = min(m, n)
    cw = bits.count_width(rank)
    counts = [reader.uint(cw) for _ in BITS]
    if sum(counts) > rank:
        raise ArtifactError(f"{reader.what}: {sum(counts)} singular pairs exceed rank {rank}")
    g = params.group_size
    left = reader.remaining() + 3 * cw
    layouts = [zp for zp in (True, False) if exact_size(m, n, counts, g, cw, zp) == left]
    if not layouts:
        raise ArtifactError(f"{reader.what}: {left} bytes fit neither quantiser's layout for counts {counts}")
    zp = layouts[0]  # the two lengths differ whenever a pair is stored
    out = torch.zeros(m, n, dtype=torch.float32)
    for count, nbits in zip(counts, BITS):
        if count:
            us = _dequantize_vectors(reader, count, m, nbits, g, zp)
            v = _dequantize_vectors(reader, count, n, nbits, g, zp)
            out += us.T @ v
    reader.done()
    return out.to(ctx.device)
