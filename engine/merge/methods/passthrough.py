"""Passthrough: one input's tensor, as it is, or times a per-input `scale`.

As mergekit's `passthrough` (mergekit/merge_methods/passthrough.py, 0.1.5): exactly one input
per tensor; its per-input `scale` (default none) multiplies it. It is the method of
frankenmerges (``slices`` stacking layer ranges of one model per slice, ``engine.merge.slices``),
where `scale` with a filter (e.g. 0 on `o_proj` and `down_proj`) damps a repeated layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from engine.errors import IncompatibleModelsError, ParameterError
from engine.merge.common import MethodParams, NoModelParams, finish, prepare_inputs

NAME = "passthrough"
PAPER = "mergekit `passthrough` (Goddard et al., Arcee's MergeKit, EMNLP 2024 industry track, arXiv:2403.13257)"
REQUIRES_BASE = False
MAX_MODELS = 1


Params = NoModelParams


class ModelParams(MethodParams):
    scale: float | None = Field(None, description="Multiply this input's tensor by this value "
                                                   "(mergekit `scale`; none: the tensor as it is).")


def validate(params: Params, model_params: Sequence[ModelParams]) -> None:
    if len(model_params) != 1:
        raise ParameterError(f"passthrough takes exactly 1 input per tensor (one source per slice), "
                             f"got {len(model_params)}")


def keeps_copies(params: Params, model_params: Sequence[ModelParams]) -> bool:
    """Whether the input alone is the result (no scale): then it is copied bit for bit."""
    return all(mp.scale is None for mp in model_params)


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
    if base is not None and tensors and tuple(base.shape) != tuple(tensors[0].shape):
        # the base takes no part, but a base of another shape is a recipe mixing models up
        raise IncompatibleModelsError(f"{NAME}: shapes differ", tensor=name or None, reasons=[
            f"base has shape {tuple(base.shape)}, input 0 has {tuple(tensors[0].shape)}"])
    _, inputs = prepare_inputs(NAME, None, tensors, model_params, name=name, requires_base=False,
                               max_models=1)
    scale = model_params[0].scale
    return finish(inputs[0] if scale is None else inputs[0] * scale, NAME, name)
