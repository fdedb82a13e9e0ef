"""Low-rank truncation of the delta: ``d ~ U_r S_r V_r^T``.

Stored: ``U_r S_r`` (m x r) and ``V_r`` (n x r) in fp16, so a rank costs ``2 (m + n)`` bytes;
with a target ratio ``r`` is the largest rank that fits the tensor's byte budget. The SVD runs
in float32 on the compute device (float64 on CPU for small matrices is not needed: the error is
the truncation, not the arithmetic).
"""

from __future__ import annotations

import torch
from pydantic import Field

from engine.compress import bits
from engine.compress.registry import CompressParams
from engine.errors import ArtifactError

NAME = "svd"
PAPER = ("Truncated SVD of the delta (low-rank baseline); e.g. Ryu et al., Efficient Storage of "
         "Fine-Tuned Models via Low-Rank Approximation of Weight Residuals, arXiv:2305.18425")
SOLVED = ("rank",)


class Params(CompressParams):
    rank: int | None = Field(None, ge=1, description="Kept rank (solved from --ratio).")


def svd(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD in float32 (float64 fallback if the fast driver fails to converge)."""
    try:
        return torch.linalg.svd(delta.to(torch.float32), full_matrices=False)
    except RuntimeError:
        u, s, vh = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
        return u.float(), s.float(), vh.float()


def encode(delta: torch.Tensor, budget: int | None, params: Params, ctx) -> bytes:
    m, n = delta.shape
    full = min(m, n)
    cw = bits.count_width(full)
    if budget is None:
        r = min(full, params.rank)
    else:
        r = min(full, max(0, (budget - cw) // (2 * (m + n))))
    if r == 0:
        return b""
    u, s, vh = svd(delta)
    ctx.info.update(rank=int(r))
    out = bits.SectionWriter()
    out.uint(r, cw)
    out.f16((u[:, :r] * s[:r]).cpu().numpy())
    out.f16(vh[:r].T.contiguous().cpu().numpy())
    return out.getvalue()


def decode(reader: bits.SectionReader, shape, params: Params, ctx) -> torch.Tensor:
    m, n = shape
    r = reader.uint(bits.count_width(min(m, n)))
    if not 0 < r <= min(m, n):
        raise ArtifactError(f"{reader.what}: rank {r} outside 1..{min(m, n)}")
    us = torch.from_numpy(reader.f16(m * r).reshape(m, r))
    v = torch.from_numpy(reader.f16(n * r).reshape(n, r))
    reader.done()
    return (us.to(ctx.device) @ v.to(ctx.device).T)
