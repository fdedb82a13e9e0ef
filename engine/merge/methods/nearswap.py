"""NearSwap: take the other model's value only where it is already close to the base's.

As mergekit's `nearswap` (mergekit/merge_methods/nearswap.py, 0.1.5), per entry, base a and one
model b: weight = clamp(t / max(|a - b|, 1e-6), 0, 1), result weight * b + (1 - weight) * a.
Entries that differ by at most t take b whole; farther ones move towards b by t / |a - b|,
i.e. by a step of length t at most. `t` may vary by layer and filter like slerp's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from engine.errors import ParameterError
from engine.merge.common import MethodParams, NoModelParams, finish, prepare_inputs

NAME = "nearswap"
PAPER = ("alchemonaut, NearSwap (model card of QuartetAnemoi-70B-t0.0001, Hugging Face; "
         "mergekit `nearswap`)")
REQUIRES_BASE = True
MAX_MODELS = 1  # the base and ONE other model

DIFF_FLOOR = 1e-6  # |a - b| is clamped here before dividing (mergekit's)


class Params(MethodParams):
    t: float = Field(..., ge=0.0, description="Similarity threshold: entries within t of the base take the "
                                              "other model's value, farther ones move t towards it "
                                              "(mergekit `t`; e.g. 0.0001).")


ModelParams = NoModelParams


def validate(params: Params, model_params: Sequence[ModelParams]) -> None:
    if len(model_params) != 1:
        raise ParameterError("nearswap merges the base_model with exactly 1 model (recipe key "
                             f"`models`, besides `base_model`), got {len(model_params)}")


def merge_tensor(
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    model_params: list[ModelParams],
    params: Params,
    *,
    name: str = "",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    a, inputs = prepare_inputs(NAME, base, tensors, model_params, name=name, requires_base=True,
                               max_models=1)
    return finish(combine(a, inputs[0], params.t), NAME, name)


def combine(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """weight * b + (1 - weight) * a, weight = clamp(t / max(|a - b|, 1e-6), 0, 1), entry by
    entry (float32 a and b of one shape; the chunked kernel calls it on slices)."""
    weight = (t / (a - b).abs().clamp(min=DIFF_FLOOR)).clamp(0.0, 1.0)
    return weight * b + (1 - weight) * a
