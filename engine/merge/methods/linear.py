"""Linear (model soup): sum_i w_i W_i, divided by sum_i w_i when normalize (the default).

mergekit `linear`: per-model `weight` required, global `normalize` default true
(mergekit/merge_methods/linear.py). No base model is used; one passed in is ignored.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from engine.merge.common import MethodParams, RequiredWeight, check_normalizable, finish, prepare_inputs, weights_column

NAME = "linear"
PAPER = "Wortsman et al., Model soups: averaging weights of multiple fine-tuned models improves accuracy without increasing inference time, ICML 2022 (arXiv:2203.05482)"
REQUIRES_BASE = False
DEFAULT_WEIGHT = "share"  # a soup starts as the plain mean: 1/n each


class Params(MethodParams):
    normalize: bool = Field(True, description="Divide by the sum of the weights (weights then need not sum to 1).")


ModelParams = RequiredWeight


def validate(params: Params, model_params: Sequence[ModelParams]) -> None:
    if params.normalize:
        check_normalizable(NAME, [mp.weight for mp in model_params])


def merge_tensor(
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    model_params: list[ModelParams],
    params: Params,
    *,
    name: str = "",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    validate(params, model_params)
    _, inputs = prepare_inputs(NAME, None, tensors, model_params, name=name, requires_base=False)
    w = weights_column([mp.weight for mp in model_params], inputs[0])
    out = (torch.stack(inputs) * w).sum(dim=0)
    if params.normalize:
        out = out / w.sum()
    return finish(out, NAME, name)
