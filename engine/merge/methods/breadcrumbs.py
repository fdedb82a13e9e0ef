"""Model Breadcrumbs: drop the largest gamma fraction and the smallest entries (keeping density), weighted sum.

mergekit method `breadcrumbs`: normalize defaults to False, rescale to False
(mergekit/merge_methods/registry.py); the arithmetic lives in engine/merge/gta.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from engine.merge import gta
from engine.merge.gta import BreadcrumbsModelParams, GTAParams

NAME = "breadcrumbs"
PAPER = "Davari & Belilovsky, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks, ECCV 2024 (arXiv:2312.06795)"
REQUIRES_BASE = True
RANDOMIZED = False


class Params(GTAParams):
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
        sparsification='magnitude_outliers', consensus=None,
    )
