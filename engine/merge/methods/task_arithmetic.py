"""Task arithmetic: W0 + lambda * sum_i w_i (W_i - W0); no normalisation by default.

mergekit method `task_arithmetic`: normalize defaults to False, rescale to False
(mergekit/merge_methods/registry.py); the arithmetic lives in engine/merge/gta.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from engine.merge.common import RequiredWeight
from engine.merge import gta
from engine.merge.gta import GTAParams

NAME = "task_arithmetic"
PAPER = "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023 (arXiv:2212.04089)"
REQUIRES_BASE = True
RANDOMIZED = False


class Params(GTAParams):
    normalize: bool = Field(False, description="Divide the merged task vector by the sum of the weights used.")
    rescale: bool = Field(False, description="Rescale sparsified task vectors (see rescale_norm).")


ModelParams = RequiredWeight


def validate(params: Params, model_params: Sequence[ModelParams]) -> None:
    gta.validate(NAME, params, model_params)


def merge_tensor(
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    model_params: list[ModelParams],
    params: Params,
    *,
    name: str = "",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    return gta.merge(
        NAME, base, tensors, model_params, params, name=name, generator=generator,
        sparsification=None, consensus=None,
    )
