"""TIES: trim each task vector to its top-density magnitudes, elect signs, disjoint mean.

mergekit method `ties`: normalize defaults to True, rescale to False
(mergekit/merge_methods/registry.py); the arithmetic lives in engine/merge/gta.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from engine.merge import gta
from engine.merge.gta import ConsensusParams, DensityModelParams

NAME = "ties"
PAPER = "Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023 (arXiv:2306.01708)"
REQUIRES_BASE = True
RANDOMIZED = False


class Params(ConsensusParams):
    normalize: bool = Field(True, description="Divide the merged task vector by the sum of the weights used.")
    rescale: bool = Field(False, description="Rescale sparsified task vectors (see rescale_norm).")


ModelParams = DensityModelParams


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
        sparsification='magnitude', consensus=params.consensus_method,
    )
