"""DARE (linear): drop each delta entry with probability 1 - density, rescale, weighted sum.

mergekit method `dare_linear`: normalize defaults to False, rescale to True
(mergekit/merge_methods/registry.py); the arithmetic lives in engine/merge/gta.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from engine.merge import gta
from engine.merge.gta import GTAParams, RandomDensityModelParams

NAME = "dare_linear"
PAPER = "Yu et al., Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch, ICML 2024 (arXiv:2311.03099)"
REQUIRES_BASE = True
RANDOMIZED = True


class Params(GTAParams):
    normalize: bool = Field(False, description="Divide the merged task vector by the sum of the weights used.")
    rescale: bool = Field(True, description="Rescale sparsified task vectors (see rescale_norm).")


ModelParams = RandomDensityModelParams


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
        sparsification='random', consensus=None,
    )
