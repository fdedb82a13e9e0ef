"""Pairwise metrics between two task vectors ``a``, ``b`` of the same tensor, and whole-model
summaries (see ../shared/specs/analysis.md).

Per tensor:

- ``cosine`` of the flattened vectors (float64 sums; None when either is all zero); ``dot`` is
  kept too, so whole-model cosines can be summed from per-tensor rows;
- top-k sets: ``k = ceil(density * numel)``; the top-k set of ``a`` holds the entries with
  |a| >= the k-th largest |a| (ties included, found by selection, not a sort), zeros excluded;
- ``sign_conflict``: among entries in the top-k set of ``a`` or of ``b`` (the union), the
  fraction where a and b have strictly opposite signs (None when the union is empty);
- ``topk_jaccard``: |Ta & Tb| / |Ta | Tb| (None when both are empty);
- ``principal_cosines``: cosines of the principal angles between the top-r left singular
  subspaces, i.e. the singular values of U_a^T U_b (descending, in [0, 1]);
  ``subspace_overlap`` = mean of their squares = ||U_a^T U_b||_F^2 / r (1: same subspace, about
  r/m for random ones). None for 1-D tensors or an all-zero delta.

Whole model: ``cosine_matrix`` from per-tensor dots and squared norms (task x task).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from engine.analysis.spectra import finite_part, sq_norm

_CHUNK = 1 << 22


class PairParams(BaseModel):
    """Parameters of the pairwise metrics (part of the cache key)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    density: float = Field(0.2, gt=0.0, le=1.0, description="Fraction of entries in each top-k set "
                           "(sign conflicts and Jaccard overlap); 0.2 is TIES' default.")
    subspace_rank: int = Field(8, ge=1, le=1024, description="Rank r of the singular subspaces whose "
                               "principal angles are reported.")


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """Sum of a * b in float64, in chunks."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    total = 0.0
    for start in range(0, fa.numel(), _CHUNK):
        total += float(torch.dot(fa[start:start + _CHUNK].double(), fb[start:start + _CHUNK].double()))
    return total


def cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    na, nb = sq_norm(a), sq_norm(b)
    if na == 0.0 or nb == 0.0:
        return None
    return max(-1.0, min(1.0, dot(a, b) / math.sqrt(na * nb)))


def topk_mask(t: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the entries with |t| >= the k-th largest |t|, k = ceil(density * numel),
    zeros excluded (flattened)."""
    flat = t.reshape(-1).abs()
    n = flat.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=t.device)
    k = min(n, max(1, math.ceil(density * n)))
    if k == n:
        threshold = flat.min()
    else:
        threshold = torch.kthvalue(flat, n - k + 1).values
    return (flat >= threshold) & (flat > 0)


def sign_conflict(a: torch.Tensor, b: torch.Tensor, mask_a: torch.Tensor, mask_b: torch.Tensor) -> float | None:
    union = mask_a | mask_b
    count = int(union.sum())
    if count == 0:
        return None
    fa, fb = a.reshape(-1), b.reshape(-1)
    opposite = ((fa * fb) < 0) & union
    return int(opposite.sum()) / count


def jaccard(mask_a: torch.Tensor, mask_b: torch.Tensor) -> float | None:
    union = int((mask_a | mask_b).sum())
    if union == 0:
        return None
    return int((mask_a & mask_b).sum()) / union


def principal_cosines(left_a: torch.Tensor | None, left_b: torch.Tensor | None, rank: int) -> list[float] | None:
    """Singular values of U_a^T U_b over the top ``rank`` columns (None if either is missing)."""
    if left_a is None or left_b is None:
        return None
    r = min(rank, left_a.shape[1], left_b.shape[1])
    if r == 0:
        return None
    ua, ub = left_a[:, :r].double(), left_b[:, :r].double()
    values = torch.linalg.svdvals(ua.mT @ ub).clamp(0.0, 1.0)
    return [float(v) for v in values]


def pair_metrics(a: torch.Tensor, b: torch.Tensor, params: PairParams, *,
                 left_a: torch.Tensor | None = None, left_b: torch.Tensor | None = None) -> dict:
    """Every pairwise metric of one tensor's two task vectors (non-finite entries count as 0)."""
    a, _, _ = finite_part(a)
    b, _, _ = finite_part(b)
    na, nb = sq_norm(a), sq_norm(b)
    ab = dot(a, b)
    mask_a, mask_b = topk_mask(a, params.density), topk_mask(b, params.density)
    cosines = principal_cosines(left_a, left_b, params.subspace_rank)
    return {
        "dot": ab,
        "cosine": (max(-1.0, min(1.0, ab / math.sqrt(na * nb))) if na > 0 and nb > 0 else None),
        "sign_conflict": sign_conflict(a, b, mask_a, mask_b),
        "topk_jaccard": jaccard(mask_a, mask_b),
        "principal_cosines": cosines,
        "subspace_overlap": (sum(c * c for c in cosines) / len(cosines)) if cosines else None,
    }


def cosine_matrix(sq_norms: Sequence[float], dots: dict[tuple[int, int], float]) -> list[list[float | None]]:
    """Task x task cosine of whole task vectors from summed squared norms and pairwise dots
    (``dots[(i, j)]`` for i < j). Diagonal 1 (None for an all-zero task vector)."""
    n = len(sq_norms)
    out: list[list[float | None]] = [[None] * n for _ in range(n)]
    for i in range(n):
        out[i][i] = 1.0 if sq_norms[i] > 0 else None
        for j in range(i + 1, n):
            d = dots.get((i, j))
            if d is None or sq_norms[i] <= 0 or sq_norms[j] <= 0:
                continue
            c = max(-1.0, min(1.0, d / math.sqrt(sq_norms[i] * sq_norms[j])))
            out[i][j] = out[j][i] = c
    return out
