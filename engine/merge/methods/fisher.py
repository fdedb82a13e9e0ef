"""Fisher merging: a per-entry weighted mean with diagonal Fisher information as weights.

W = sum_i w_i F_i W_i / sum_i w_i F_i, with F_i floored at fisher_floor (the authors' code
takes max(F_i, floor), so entries no task is sensitive to fall back to the w-weighted mean
and the division is always defined). F_i is the diagonal Fisher of model i on its task's
calibration prompts (mean squared gradient of the log-likelihood), passed as stats=[F_1..F_N].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from engine.errors import ParameterError
from engine.merge.common import DefaultWeight, MethodParams, finish, prepare_inputs, prepare_stats, weights_column

NAME = "fisher"
PAPER = "Matena & Raffel, Merging Models with Fisher-Weighted Averaging, NeurIPS 2022 (arXiv:2111.09832)"
REQUIRES_BASE = False
STATS = "fisher"  # stats=[diagonal Fisher of each model, shaped like the tensor]


class Params(MethodParams):
    fisher_floor: float = Field(1e-6, gt=0.0, description="Lower bound applied to every Fisher value, so every weight is positive.")


class ModelParams(DefaultWeight):
    weight: float = Field(1.0, ge=0.0, description="Multiplies this model's Fisher (the authors' lambda_i).")


def validate(params: Params, model_params: Sequence[ModelParams]) -> None:
    if sum(mp.weight for mp in model_params) <= 0:
        raise ParameterError(f"{NAME}: at least one weight must be positive")


def merge_tensor(
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    model_params: list[ModelParams],
    params: Params,
    *,
    name: str = "",
    generator: torch.Generator | None = None,
    stats: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    validate(params, model_params)
    _, inputs = prepare_inputs(NAME, None, tensors, model_params, name=name, requires_base=False)
    fishers = prepare_stats(NAME, stats, len(inputs), tuple(inputs[0].shape), inputs[0].device, name=name, what="Fisher",
                           dtype=inputs[0].dtype)
    if any(bool((f < 0).any()) for f in fishers):
        raise ParameterError(f"{NAME}: a Fisher has negative entries (it is a mean of squares)", tensor=name or None)
    w = weights_column([mp.weight for mp in model_params], inputs[0])
    coeff = torch.stack(fishers).clamp(min=params.fisher_floor) * w
    out = (coeff * torch.stack(inputs)).sum(dim=0) / coeff.sum(dim=0)
    return finish(out, NAME, name)
