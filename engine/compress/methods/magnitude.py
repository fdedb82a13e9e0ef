"""Magnitude pruning of the delta: keep the ``k`` entries of largest ``|d|``.

Stored: which entries (a bit mask, or Golomb-Rice coded gaps between kept indices, whichever
is smaller) and their values in fp16. With a target ratio, ``k`` is the largest count whose
section fits the tensor's byte budget (the index cost depends on the positions, so sizes are
measured, not estimated).
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from engine.compress import bits
from engine.compress.registry import CompressParams

NAME = "magnitude"
PAPER = ("Magnitude-based delta sparsification (top-k of |delta|), the classic baseline; "
         "see e.g. Yadav et al., TIES-Merging, NeurIPS 2023 (trim step)")
SOLVED = ("density",)

MASK, RICE = 0, 1


class Params(CompressParams):
    density: float | None = Field(None, gt=0.0, le=1.0,
                                  description="Fraction of entries kept (solved from --ratio).")


def _index_cost(idx_sorted: np.ndarray, n: int, cw: int) -> tuple[int, int, int]:
    """(bytes, kind, rice r) of the cheapest index encoding."""
    mask_bytes = (n + 7) // 8
    if idx_sorted.size == 0:
        return mask_bytes, MASK, 0
    r = bits.rice_parameter(idx_sorted)
    ub, rb = bits.rice_bytes(idx_sorted, r)
    rice = 1 + cw + ub + rb
    return (rice, RICE, r) if rice < mask_bytes else (mask_bytes, MASK, 0)


def section_size(idx_sorted: np.ndarray, n: int) -> int:
    cw = bits.count_width(n)
    return 1 + cw + _index_cost(idx_sorted, n, cw)[0] + 2 * idx_sorted.size


def encode(delta: torch.Tensor, budget: int | None, params: Params, ctx) -> bytes:
    flat = delta.reshape(-1)
    n = flat.numel()
    cw = bits.count_width(n)
    if budget is None:
        k = min(n, max(1, round(params.density * n)))
        order = torch.topk(flat.abs(), k, sorted=True).indices.cpu().numpy()
    else:
        k_max = min(n, max(0, (budget - 1 - cw) // 2))
        if k_max == 0:
            return b""
        order = torch.topk(flat.abs(), k_max, sorted=True).indices.cpu().numpy()
        lo, hi = 0, k_max  # largest k with size(k) <= budget
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if section_size(np.sort(order[:mid]), n) <= budget:
                lo = mid
            else:
                hi = mid - 1
        k = lo
        if k == 0:
            return b""
    idx = np.sort(order[:k]).astype(np.int64)
    ctx.info.update(kept=int(k), density=k / n)
    out = bits.SectionWriter()
    _, kind, r = _index_cost(idx, n, cw)
    out.uint(kind, 1)
    out.uint(k, cw)
    if kind == RICE:
        unary, rem = bits.rice_encode(idx, r)
        out.uint(r, 1)
        out.uint(len(unary), cw)
        out.raw(unary)
        out.raw(rem)
    else:
        mask = np.zeros(n, dtype=bool)
        mask[idx] = True
        out.raw(bits.pack_bits(mask))
    out.f16(flat[torch.from_numpy(idx).to(flat.device)].cpu().numpy())
    return out.getvalue()


def decode(reader: bits.SectionReader, shape, params: Params, ctx) -> torch.Tensor:
    n = int(np.prod(shape))
    cw = bits.count_width(n)
    kind = reader.uint(1)
    k = reader.uint(cw)
    if k > n:
        raise reader_error(reader, f"kept count {k} exceeds {n} entries")
    if kind == RICE:
        r = reader.uint(1)
        ub = reader.uint(cw)
        unary = reader.raw(ub)
        rem = reader.raw(bits.packed_uint_bytes(k, r) if r else 0)
        idx = bits.rice_decode(unary, rem, k, r)
    elif kind == MASK:
        idx = np.flatnonzero(reader.bits(n))
    else:
        raise reader_error(reader, f"unknown index encoding {kind}")
    if idx.size != k or (idx.size and (idx[-1] >= n or idx[0] < 0)):
        raise reader_error(reader, "kept indices are inconsistent")
    values = reader.f16(k)
    reader.done()
    out = torch.zeros(n, dtype=torch.float32)
    out[torch.from_numpy(idx)] = torch.from_numpy(values)
    return out.reshape(tuple(shape)).to(ctx.device)


def reader_error(reader: bits.SectionReader, message: str):
    from engine.errors import ArtifactError

    return ArtifactError(f"{reader.what}: {message}")
