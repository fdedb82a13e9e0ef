"""Model Stock: interpolate between the base and the mean of the fine-tunes by an angle-derived t.

As in mergekit/merge_methods/model_stock.py: cos = mean over pairs i < j of the cosine between
deltas d_i = W_i - W0 (dot / max(|d_i| |d_j|, 1e-6), clipped to [-1, 1]);
t = N cos / (1 + (N - 1) cos); result t * mean_i W_i + (1 - t) W0. With filter_wise the
cosine and t are per row (first dimension; 1-D tensors are one row).

The mean pairwise cosine of N vectors is at least -1/(N-1), so 1 + (N-1) cos >= 0; it is 0
only when the deltas cancel exactly, where mergekit divides by zero. Here t is set to 0 (the
base) wherever that denominator is below 1e-6.
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
    deltas = [w - w0 for w in ws]
    norms = [d.norm(dim=-1) for d in deltas]
    cosines = []
    for i in range(len(deltas)):
        for j in range(i + 1, len(deltas)):
            dot = (deltas[i] * deltas[j]).sum(dim=-1)
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1.0, 1.0))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos
    safe = denominator >= 1e-6
    t = torch.where(safe, n * cos / torch.where(safe, denominator, torch.ones_like(denominator)), torch.zeros_like(cos))
    mean = torch.stack(ws).mean(dim=0)
    out = t * mean + (1 - t) * w0
    return finish(out.reshape(shape), NAME, name)
