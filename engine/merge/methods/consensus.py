"""Consensus merging with TALL masks: keep only entries that at least k tasks rely on.

Multi-task vector d = sum_i w_i d_i. Task i's TALL mask marks entries where its own delta
outweighs the rest of the merge: m_i = |d_i| > lambda_i |d - d_i| (strict, as in the
authors' code). Entries in at least k masks survive (k = 2 drops "selfish" entries, used by
one task only, and "catastrophic" ones, used by none); result W0 + lambda * (mask * d).
k = 0 reduces to task arithmetic.

Merging N copies of one fine-tune gives it back only when every copy's mask is full
(tall_mask_lambda * (N - 1) < 1) and lambda * sum_i w_i = 1; with one model and k >= 2 nothing
survives and the result is the base, by design.

With ``task`` set, the result is instead that task's TALL-mask model W0 + lambda * (m_t * d),
the paper's task-specific reconstruction (k is not used): the authors choose each task's
tall_mask_lambda on its validation data with it, from {0.2, 0.3, 0.4, 0.5, 0.6}, then build the
consensus mask from those masks and tune lambda over {0.1, ..., 1.0} on validation
(nik-dim/tall_masks: src/eval/eval.py, src/utils/tallmask_utils.py). The fixed defaults here
(tall_mask_lambda 0.4, lambda 1) are ours for an untuned run; bench/merge_quality.py reports
both them and the values tuned on the zoo's dev examples.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from engine.errors import ParameterError
from engine.merge.common import DefaultWeight, MethodParams, finish, prepare_inputs, weights_column

NAME = "consensus"
PAPER = "Wang et al., Localizing Task Information for Improved Model Merging and Compression (TALL masks, Consensus Merging), ICML 2024 (arXiv:2405.07813)"
REQUIRES_BASE = True


class Params(MethodParams):
    k: int = Field(2, ge=0, description="Minimum number of task masks an entry must be in to be kept (2 removes selfish and catastrophic weights).")
    lambda_: float = Field(1.0, alias="lambda", description="Scale of the masked multi-task vector before adding it to the base "
                           "(the authors tune it on validation over 0.1-1.0; 1 is our untuned default).")
    task: int | None = Field(None, ge=0, description="Rebuild this task's TALL-mask model, base + lambda * (its mask * the "
                             "multi-task vector), instead of the consensus merge (0-based input position).")


class ModelParams(DefaultWeight):
    tall_mask_lambda: float = Field(
        0.4, gt=0.0, description="TALL mask threshold for this task: keep where |d_i| > lambda_i |d - d_i| (paper searches 0.2-0.6)."
    )


def validate(params: Params, model_params: Sequence[ModelParams]) -> None:
    if params.task is not None and params.task >= len(model_params):
        raise ParameterError(f"{NAME}: task {params.task} out of range for {len(model_params)} models")


def tall_masks(deltas: torch.Tensor, multi_task: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """deltas: (N, ...) stacked weighted task vectors; (N, ...) bool TALL masks."""
    lam = torch.tensor(list(thresholds), dtype=deltas.dtype, device=deltas.device).view(-1, *([1] * multi_task.dim()))
    return deltas.abs() > lam * (multi_task - deltas).abs()


def consensus_mask(deltas: torch.Tensor, multi_task: torch.Tensor, thresholds: Sequence[float], k: int) -> torch.Tensor:
    """deltas: (N, ...) stacked weighted task vectors; returns the bool mask of entries in >= k TALL masks."""
    return tall_masks(deltas, multi_task, thresholds).sum(dim=0) >= k


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
    w = weights_column([mp.weight for mp in model_params], base32)
    deltas = (torch.stack(inputs) - base32) * w
    validate(params, model_params)
    multi_task = deltas.sum(dim=0)
    thresholds = [mp.tall_mask_lambda for mp in model_params]
    if params.task is not None:
        keep = tall_masks(deltas, multi_task, thresholds)[params.task]
    else:
        keep = consensus_mask(deltas, multi_task, thresholds, params.k)
    out = base32 + params.lambda_ * (multi_task * keep)
    return finish(out, NAME, name)
