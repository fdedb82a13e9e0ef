"""DELLA: magnitude-rank keep probabilities (MagPrune) per row, rescale, TIES sign consensus.

mergekit method `della`: normalize defaults to True, rescale to True
(mergekit/merge_methods/registry.py); the arithmetic lives in engine/merge/gta.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from engine.merge import gta
from engine.merge.gta import ConsensusParams, DellaModelParams

NAME = "della"
PAPER = "Deep et al., DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling, 2024 (arXiv:2406.11617)"
REQUIRES_BASE = True
RANDOMIZED = True


class Params(ConsensusParams):
    normalize: bool = Field(True, description="Divide the merged task vector by the sum of the weights used.")
    rescale: bool = Field(True, description="Rescale sparsified task vectors (see rescale_norm).")


ModelParams = DellaModelParams


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
        sparsification='della_magprune', consensus=params.consensus_method,
    )
