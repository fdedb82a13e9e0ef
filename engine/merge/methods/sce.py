"""SCE (Select, Calculate, Erase): FuseChat's merge of task vectors with weights from their size.

As mergekit's `sce` (mergekit/merge_methods/sce.py, 0.1.5), per tensor, task vectors
d_i = W_i - W0 stacked over the N models:
  1. Select (select_topk < 1): per entry the variance of d_i across the models (population
     variance); keep, in every d_i, only the entries with the top k = floor(select_topk * m)
     variances, m = the number of entries whose variance is not zero;
  2. Calculate: each model's weight is the mean of its selected d_i squared, divided by the
     sum over models (equal weights 1/N when that sum is below 1e-6, as mergekit);
  3. Erase: per entry the elected sign is that of sum_i d_i (zero counts as positive); entries
     of d_i of the other sign, or zero, are dropped;
  4. W0 + sum_i w_i d_i / sum_i w_i over the kept entries (divisor at least 1e-6).
mergekit takes no per-model weight for sce; a recipe's `weight` is ignored, as there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from engine.merge.common import MethodParams, NoModelParams, finish, prepare_inputs

NAME = "sce"
PAPER = ("Wan et al., FuseChat: Knowledge Fusion of Chat Models, 2024 (arXiv:2408.07990; "
         "SCE merging, mergekit `sce`)")
REQUIRES_BASE = True

WEIGHT_SUM_FLOOR = 1e-6  # below this the size-based weights are replaced by 1/N (mergekit's)
DIVISOR_FLOOR = 1e-6     # the per-entry sum of kept weights is clamped here (mergekit's)


class Params(MethodParams):
    select_topk: float = Field(
        1.0, ge=0.0, le=1.0,
        description="Fraction of entries kept, those whose task vectors vary most across the models "
                    "(mergekit `select_topk`; 1 keeps all, 0 none).")
    int8_mask: bool = Field(False, description="mergekit memory option (masks stored as int8); no effect on the result.")


ModelParams = NoModelParams


def validate(params: Params, model_params: Sequence[ModelParams]) -> None:
    return None


def select_mask(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    """Entries (of one model's shape) with the top ``fraction`` of across-model variances."""
    if fraction >= 1:
        return torch.ones(deltas.shape[1:], dtype=torch.bool, device=deltas.device)
    variance = deltas.var(dim=0, unbiased=False)
    k = int(torch.count_nonzero(variance) * fraction)  # a float32 product, floored, as mergekit
    keep = torch.zeros(variance.numel(), dtype=torch.bool, device=deltas.device)
    if k > 0:
        keep[torch.topk(variance.reshape(-1), k=k, largest=True).indices] = True
    return keep.view(variance.shape)


def size_weights(deltas: torch.Tensor) -> torch.Tensor:
    """Per model: mean squared entry over the sum of those means (1/N each when tiny)."""
    sizes = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = float(sizes.sum())
    if abs(total) < WEIGHT_SUM_FLOOR:
        return torch.full_like(sizes, 1.0 / sizes.shape[0])
    return sizes / total


def merge_tensor(
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    model_params: list[ModelParams],
    params: Params,
    *,
    name: str = "",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    base32, inputs = prepare_inputs(NAME, base, tensors, model_params, name=name, requires_base=True)
    deltas = torch.stack(inputs) - base32
    if params.select_topk < 1:
        deltas = deltas * select_mask(deltas, params.select_topk)
    elected = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
    agree = torch.sign(deltas) == elected
    w = size_weights(deltas).view(-1, *([1] * base32.dim())) * agree
    merged = (deltas * w).sum(dim=0) / w.sum(dim=0).clamp(min=DIVISOR_FLOOR)
    return finish(base32 + merged, NAME, name)
