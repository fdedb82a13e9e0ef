"""SLERP between the base model (t = 0) and one other model (t = 1), per tensor.

As in mergekit/merge_methods/slerp.py: the angle comes from the flattened tensors normalised
to unit length (a tensor with norm <= eps is left unnormalised), the sin weights are applied
to the original, unnormalised tensors, and when |cos| > 0.9995 the two are nearly colinear,
so plain linear interpolation is used instead. `t` may vary by layer and by filter; the
recipe layer resolves it per tensor (engine.merge.params.resolve) before calling here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pydantic import Field

from engine.merge.common import MethodParams, NoModelParams, finish, prepare_inputs

NAME = "slerp"
PAPER = "Shoemake, Animating Rotation with Quaternion Curves, SIGGRAPH 1985 (spherical linear interpolation; mergekit `slerp`)"
REQUIRES_BASE = True
MAX_MODELS = 1  # the base and ONE other model


class Params(MethodParams):
    t: float = Field(..., ge=0.0, le=1.0, description="Interpolation factor: 0 gives the base model, 1 the other model.")
    dot_threshold: float = Field(
        0.9995, gt=0.0, le=1.0, description="Above this |cos| the tensors count as colinear and are lerped (mergekit's DOT_THRESHOLD)."
    )
    eps: float = Field(1e-8, ge=0.0, description="Tensors with a norm at or below this are not normalised.")


ModelParams = NoModelParams


def validate(params: Params, model_params: Sequence[ModelParams]) -> None:
    return None


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> torch.Tensor:
    n0, n1 = v0.norm(), v1.norm()
    u0 = v0 / n0 if n0 > eps else v0
    u1 = v1 / n1 if n1 > eps else v1
    dot = float((u0 * u1).sum())
    theta = math.acos(max(-1.0, min(1.0, dot)))
    sin_theta = math.sin(theta)
    if abs(dot) > dot_threshold or sin_theta < 1e-12:
        return (1 - t) * v0 + t * v1
    s0 = math.sin((1 - t) * theta) / sin_theta
    s1 = math.sin(t * theta) / sin_theta
    return s0 * v0 + s1 * v1


def merge_tensor(
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    model_params: list[ModelParams],
    params: Params,
    *,
    name: str = "",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    base32, inputs = prepare_inputs(NAME, base, tensors, model_params, name=name, requires_base=True, max_models=1)
    out = slerp(params.t, base32, inputs[0], params.dot_threshold, params.eps)
    return finish(out, NAME, name)
