"""Unit-order-free comparisons of two models' weight matrices across widths (ours, beside the
debiased-CKA parameter map of ``engine.analysis.incompatibility``):

- **token-space principal subspace overlap**: a per-layer matrix W is read on its model's own
  token embeddings E (n probe tokens x width) from its hidden side, ``T = E W^T`` (a reader) or
  ``T = E W`` (a writer), an n-row matrix indexed by tokens, which both models share; its top-k
  left singular vectors span a k-dimensional subspace of token space. Two matrices are compared
  by the mean squared cosine of the principal angles between their subspaces (1: the same
  subspace, k/n: unrelated ones on average). A permutation or rotation of either model's
  hidden units leaves T, and so the value, unchanged.
- **singular-value spectrum similarity**: the cosine of the two matrices' sorted singular values
  (each normalised to unit length, the shorter padded with zeros): unchanged by any
  permutation or rotation of either side of either matrix.

A crop of the larger matrix to the smaller's leading rows and columns (what the map once did)
compares hidden units with no correspondence and changes under a permutation of them; the
tests show both.
"""

from __future__ import annotations

import torch

SUBSPACE_MEASURE = "token-space principal subspace overlap (mean cos^2 of principal angles)"


def token_side(w: torch.Tensor, embed_rows: torch.Tensor, side: int) -> torch.Tensor:
    """``E W^T`` (side 1: W's columns run over hidden units) or ``E W`` (side 0: its rows)."""
    w, e = w.double(), embed_rows.double()
    return e @ w.mT if side == 1 else e @ w


def principal_basis(t: torch.Tensor, k: int) -> torch.Tensor:
    """Orthonormal basis (n x k) of the top-k left singular subspace of ``t``."""
    u, _, _ = torch.linalg.svd(t.double(), full_matrices=False)
    return u[:, :min(k, u.shape[1])]


def principal_cosines(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between span(u) and span(v) (orthonormal columns),
    largest first: the singular values of ``u^T v`` (Bjorck and Golub)."""
    return torch.linalg.svdvals(u.mT @ v).clamp(0.0, 1.0)


def subspace_overlap(u: torch.Tensor, v: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles (over min(k_u, k_v) angles)."""
    return float(principal_cosines(u, v).pow(2).mean())


def spectrum_similarity(w_a: torch.Tensor, w_b: torch.Tensor) -> float | None:
    """Cosine of the normalised, sorted singular values (zero-padded); None for a zero matrix."""
    sa, sb = torch.linalg.svdvals(w_a.double()), torch.linalg.svdvals(w_b.double())
    n = max(sa.numel(), sb.numel())
    sa = torch.nn.functional.pad(sa, (0, n - sa.numel()))
    sb = torch.nn.functional.pad(sb, (0, n - sb.numel()))
    na, nb = float(sa.norm()), float(sb.norm())
    if na == 0.0 or nb == 0.0:
        return None
    return float(sa @ sb) / (na * nb)


def cropped_cosine(w_a: torch.Tensor, w_b: torch.Tensor) -> float:
    """The old crop: the cosine of both matrices cut to their common leading rows and columns
    (kept only to show, in tests, that it depends on the order of hidden units)."""
    r, c = min(w_a.shape[0], w_b.shape[0]), min(w_a.shape[1], w_b.shape[1])
    x, y = w_a[:r, :c].double().flatten(), w_b[:r, :c].double().flatten()
    return float(x @ y / (x.norm() * y.norm()))
