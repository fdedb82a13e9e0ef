"""Model Breadcrumbs masks followed by the TIES sign consensus.

mergekit method `breadcrumbs_ties`: normalize defaults to False, rescale to False
(mergekit/merge_methods/registry.py); the arithmetic lives in engine/merge/gta.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from engine.merge import gta
from engine.merge.gta import BreadcrumbsModelParams, ConsensusParams

NAME = "breadcrumbs_ties"
PAPER = "Davari & Belilovsky, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks, ECCV 2024 (arXiv:2312.06795)"
REQUIRES_BASE = True
RANDOMIZED = False


class Params(ConsensusParams):
    normalize: bool = Field(False, description="Divide the merged task vector by the sum of the weights used.")
    rescale: bool = Field(False, description="Rescale sparsified task vectors (see rescale_norm).")


ModelParams = BreadcrumbsModelParams


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
        sparsification='magnitude_outliers', consensus=params.consensus_method,
    )
