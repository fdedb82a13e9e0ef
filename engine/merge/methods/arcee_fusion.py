"""Arcee Fusion: take from one fine-tune only the changes that matter most, over its base.

As mergekit's `arcee_fusion` (mergekit/merge_methods/arcee_fusion.py, 0.1.5), per tensor, base
W0 and one model W1:
  1. importance = |W1 - W0| * KL(p || q), where p = softmax(W1) + 1e-8 and q = softmax(W0) +
     1e-8 along the last dimension and the KL divergence sum p log(p / q) is taken per row
     (one value per row, broadcast over it; a 1-D tensor is one row);
  2. threshold = median + 1.5 (q3 - q1) over every entry's importance (an upper Tukey fence),
     each quantile the sorted value at index floor(q (n - 1));
  3. W0 + (W1 - W0) where importance >= threshold, W0 elsewhere.

mergekit estimates the quantiles from 1,000,000 entries drawn at random (with replacement)
when a tensor is larger, so its threshold, and the merge, change from run to run on large
tensors. Here the quantiles are exact order statistics of every entry (ours; identical to
mergekit's up to 1,000,000 entries), all three found in one bracketing pass plus selection
(engine.merge.order_stats), not a full sort.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.errors import ParameterError
from engine.merge.common import MethodParams, NoModelParams, finish, prepare_inputs
from engine.merge.order_stats import order_statistics

NAME = "arcee_fusion"
PAPER = ("Arcee AI, Arcee Fusion: importance-thresholded fusion of one model into its base "
         "(arcee.ai; mergekit `arcee_fusion`; no paper)")
REQUIRES_BASE = True
MAX_MODELS = 1  # the base and ONE other model

SOFTMAX_EPS = 1e-8


class Params(MethodParams):
    """mergekit's arcee_fusion takes no parameters."""


ModelParams = NoModelParams


def validate(params: Params, model_params: Sequence[ModelParams]) -> None:
    if len(model_params) != 1:
        raise ParameterError("arcee_fusion merges the base_model with exactly 1 model (recipe key "
                             f"`models`, besides `base_model`), got {len(model_params)}")


def importance(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(model, dim=-1) + SOFTMAX_EPS
    q = torch.softmax(base, dim=-1) + SOFTMAX_EPS
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return (model - base).abs() * kl


def fence(scores: torch.Tensor) -> torch.Tensor:
    """median + 1.5 * (q3 - q1), quantile q at sorted index floor(q (n - 1))."""
    flat = scores.reshape(-1)
    last = flat.numel() - 1
    q1, median, q3 = order_statistics(flat, [(k * last) // 4 for k in (1, 2, 3)])
    return median + 1.5 * (q3 - q1)


def merge_tensor(
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    model_params: list[ModelParams],
    params: Params,
    *,
    name: str = "",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    base32, inputs = prepare_inputs(NAME, base, tensors, model_params, name=name, requires_base=True,
                                    max_models=1)
    model = inputs[0]
    if model.numel() == 0:
        return finish(model.clone(), NAME, name)
    scores = importance(model, base32)
    keep = scores >= fence(scores)
    return finish(base32 + (model - base32) * keep, NAME, name)
