"""Model Stock: interpolate between the base and the mean of the fine-tunes by an angle-derived t.

As in mergekit/merge_methods/model_stock.py: cos = mean over pairs i < j of the cosine between
deltas d_i = W_i - W0 (dot / max(|d_i| |d_j|, 1e-6), clipped to [-1, 1]);
t = N cos / (1 + (N - 1) cos); result t * mean_i W_i + (1 - t) W0. With filter_wise the
cosine and t are per row (first dimension; 1-D tensors are one row).

The mean pairwise cosine of N vectors is at least -1/(N-1), so 1 + (N-1) cos >= 0; it is 0
only when the deltas cancel exactly, where mergekit divides by zero. Here t is set to 0 (the
base) wherever that denominator is below 1e-6.

Ours: the norms and dot products of the deltas are float64 sums (``delta_gram``; mergekit's
are float32), so t does not depend on how a kernel splits the tensor: the chunked CPU kernel
(engine.merge.chunked) and this whole-tensor path compute the same t. The interpolation itself
is float32, as mergekit's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from engine.merge.common import MethodParams, NoModelParams, finish, prepare_inputs

NAME = "model_stock"
PAPER = "Jang et al., Model Stock: All we need is just a few fine-tuned models, ECCV 2024 (arXiv:2403.19522)"
REQUIRES_BASE = True


class Params(MethodParams):
    filter_wise: bool = Field(False, description="Compute the angle and t per row instead of per tensor (mergekit `filter_wise`).")


ModelParams = NoModelParams


def validate(params: Params, model_params: Sequence[ModelParams]) -> None:
    return None


REDUCE_CHUNK = 1 << 20  # columns per step of the float64 reductions


def delta_gram(w0: torch.Tensor, ws: Sequence[torch.Tensor]) -> torch.Tensor:
    """float64 [rows, N, N]: sum over columns of d_i * d_j, d_i = ws[i] - w0 (float32 deltas,
    as the method forms them), accumulated a slice of columns at a time (no float64 copy of a
    whole tensor). ``w0`` and ``ws`` are [rows, columns]."""
    n = len(ws)
    rows, cols = w0.shape
    gram = torch.zeros(rows, n, n, dtype=torch.float64, device=w0.device)
    col_step = min(cols, REDUCE_CHUNK) or 1
    row_step = max(1, REDUCE_CHUNK // col_step)  # blocks of about REDUCE_CHUNK entries
    for r in range(0, rows, row_step):
        for c in range(0, cols, col_step):
            block = (slice(r, r + row_step), slice(c, c + col_step))
            d = torch.stack([w[block] - w0[block] for w in ws], dim=1).double()  # rows, N, cols
            gram[r:r + row_step] += d @ d.transpose(1, 2)
    return gram


def stock_t(gram: torch.Tensor, n: int) -> torch.Tensor:
    """t per row (float64, [rows]) from the deltas' Gram matrices [rows, N, N]."""
    norms = gram.diagonal(dim1=1, dim2=2).clamp(min=0).sqrt()  # rows, N
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            cosines.append((gram[:, i, j] / (norms[:, i] * norms[:, j]).clamp(min=1e-6)).clamp(-1.0, 1.0))
    cos = torch.stack(cosines).mean(dim=0)
    denominator = 1 + (n - 1) * cos
    safe = denominator >= 1e-6
    return torch.where(safe, n * cos / torch.where(safe, denominator, torch.ones_like(denominator)),
                       torch.zeros_like(cos))


def interpolate(t: torch.Tensor, w0: torch.Tensor, ws: Sequence[torch.Tensor]) -> torch.Tensor:
    """t * mean_i W_i + (1 - t) W0 in float32; t broadcast against [rows, columns]."""
    mean = torch.stack(list(ws)).mean(dim=0)
    return t * mean + (1 - t) * w0


def merge_tensor(
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    model_params: list[ModelParams],
    params: Params,
    *,
    name: str = "",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    base32, inputs = prepare_inputs(NAME, base, tensors, model_params, name=name, requires_base=True, min_models=2)
    shape = base32.shape
    if params.filter_wise:
        rows = lambda t: t.reshape(1, -1) if t.dim() < 2 else t.reshape(t.shape[0], -1)  # noqa: E731
    else:
        rows = lambda t: t.reshape(1, -1)  # noqa: E731
    w0 = rows(base32)
    ws = [rows(t) for t in inputs]
    t = stock_t(delta_gram(w0, ws), len(ws)).to(w0.dtype).unsqueeze(-1)
    return finish(interpolate(t, w0, ws).reshape(shape), NAME, name)
