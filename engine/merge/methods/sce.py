"""SCE (Select, Calculate, Erase): FuseChat's merge of task vectors with weights from their size.

As mergekit's `sce` (mergekit/merge_methods/sce.py, 0.1.5), per tensor, task vectors
d_i = W_i - W0 stacked over the N models:
  1. Select (select_topk < 1): per entry the variance of d_i across the models (population
     variance); keep, in every d_i, only the entries with the top k = floor(select_topk * m)
     variances, m = the number of entries whose variance is not zero;
  2. Calculate: each model's weight is the mean of its selected d_i squared, divided by the
     sum over models (equal weights 1/N when that sum is below 1e-6, as mergekit; ours: the
     squares summed in float64);
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


def square_sums(deltas: torch.Tensor) -> torch.Tensor:
    """float64 [N]: per model, the sum of its float32 deltas squared (sums over slices of a
    tensor add up to the whole tensor's, to float64 rounding)."""
    return deltas.square().reshape(deltas.shape[0], -1).sum(dim=1, dtype=torch.float64)


def size_weights(deltas: torch.Tensor) -> torch.Tensor:
    """Per model: mean squared entry over the sum of those means (1/N each when tiny)."""
    return weights_from_square_sums(square_sums(deltas), deltas[0].numel(), deltas.dtype)


def weights_from_square_sums(sums: torch.Tensor, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """``size_weights`` from ``square_sums`` of the whole tensor (``numel`` entries per model).

    The means and their ratios are taken in float64 (ours: mergekit's float32 mean differs
    from it in float32's last bits), so that a tensor summed slice by slice (the chunked
    kernel) weighs its models as the whole tensor does."""
    sizes = sums / max(numel, 1)
    total = float(sizes.sum())
    if abs(total) < WEIGHT_SUM_FLOOR:
        return torch.full((sums.shape[0],), 1.0 / sums.shape[0], dtype=dtype, device=sums.device)
    return (sizes / total).to(dtype)


def erase_and_merge(base32: torch.Tensor, deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Steps 3 and 4: W0 + the weighted mean of the deltas that agree with the elected sign
    (float32 ``base32``, ``deltas`` [N, *base32.shape], ``weights`` [N]; the chunked kernel
    calls it on slices, entry by entry the same)."""
    elected = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
    agree = torch.sign(deltas) == elected
    w = weights.view(-1, *([1] * base32.dim())) * agree
    return base32 + (deltas * w).sum(dim=0) / w.sum(dim=0).clamp(min=DIVISOR_FLOOR)


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
    return finish(erase_and_merge(base32, deltas, size_weights(deltas)), NAME, name)
