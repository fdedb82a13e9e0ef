"""SLERP between the base model (t = 0) and one other model (t = 1), per tensor.

As in mergekit/merge_methods/slerp.py: the angle comes from the flattened tensors normalised
to unit length (a tensor with norm <= eps is left unnormalised), the sin weights are applied
to the original, unnormalised tensors, and when |cos| > 0.9995 the two are nearly colinear,
so plain linear interpolation is used instead. `t` may vary by layer and by filter; the
recipe layer resolves it per tensor (engine.merge.params.resolve) before calling here.

Numerics: fine-tunes of one base are nearly colinear (cos 0.99 is typical), where
theta = acos(cos) amplifies any error in cos by 1 / sin(theta) (about 7 at cos 0.99). A float32
dot product over millions of entries is off by ~1e-4 (the summation's rounding grows with the
length), which moved the coefficients by ~1e-3 relative on a 32000 x 1024 head. So the two
squared norms and the dot product are accumulated in float64, a slice at a time (never a float64
copy of a whole tensor), and cos = dot / (|v0| |v1|) is formed from them: mathematically the
dot of the normalised vectors mergekit computes, without rounding each normalised entry first
(ours: mergekit reduces in float32). The coefficients are float64 scalars; only the final
w0 v0 + w1 v1 runs in the work dtype, as mergekit's.
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


REDUCE_CHUNK = 1 << 20  # entries per step of the float64 reductions


def norms_and_dot(v0: torch.Tensor, v1: torch.Tensor) -> tuple[float, float, float]:
    """(|v0|, |v1|, v0 . v1) over the flattened tensors, accumulated in float64 a slice at a
    time (no float64 copy of a whole tensor). Ours: mergekit reduces in float32; float64 makes
    the angle independent of how a kernel splits the tensor (the chunked CPU kernel and this
    whole-tensor path agree to ~1e-15)."""
    a, b = v0.reshape(-1), v1.reshape(-1)
    s00 = s11 = s01 = 0.0
    for start in range(0, a.numel(), REDUCE_CHUNK):
        x, y = a[start:start + REDUCE_CHUNK].double(), b[start:start + REDUCE_CHUNK].double()
        s00 += float(torch.dot(x, x))
        s11 += float(torch.dot(y, y))
        s01 += float(torch.dot(x, y))
    return math.sqrt(s00), math.sqrt(s11), s01


def weights(t: float, n0: float, n1: float, d01: float, dot_threshold: float = 0.9995,
            eps: float = 1e-8) -> tuple[float, float]:
    """(w0, w1) with slerp(v0, v1) = w0 * v0 + w1 * v1, from the norms and the dot product: the
    cosine of the tensors normalised to unit length (a norm <= eps is not normalised); nearly
    colinear (|cos| > dot_threshold) gives the lerp weights."""
    dot = d01 / ((n0 if n0 > eps else 1.0) * (n1 if n1 > eps else 1.0))
    theta = math.acos(max(-1.0, min(1.0, dot)))
    sin_theta = math.sin(theta)
    if abs(dot) > dot_threshold or sin_theta < 1e-12:
        return 1 - t, t
    return math.sin((1 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


def coefficients(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995,
                 eps: float = 1e-8) -> tuple[float, float]:
    """(w0, w1) with slerp(v0, v1) = w0 v0 + w1 v1; (1 - t, t) where mergekit lerps."""
    return weights(t, *norms_and_dot(v0, v1), dot_threshold, eps)


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> torch.Tensor:
    w0, w1 = coefficients(t, v0, v1, dot_threshold, eps)
    return w0 * v0 + w1 * v1


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
