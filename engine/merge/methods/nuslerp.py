"""NuSLERP: spherical interpolation of exactly two models, or of their task vectors over a base.

As mergekit's `nuslerp` (mergekit/merge_methods/nuslerp.py, 0.1.5): the interpolation factor
comes from the two per-model weights, t = w_1 / (w_0 + w_1) (0.5 when |w_0 + w_1| < 1e-6), so
weights 1 and 1 are the midpoint. With a base model the two task vectors d_i = W_i - W0 are
interpolated and the result added to W0; without one the weights themselves.

Which vectors are interpolated:
  - nuslerp_flatten (default): the whole tensor is one vector (as `slerp`);
  - else each row along the last dimension is its own vector (one angle per output row);
  - nuslerp_row_wise (with flatten off): the vectors run along dimension 0 instead, i.e.
    one angle per column (mergekit's naming: the tensor is transposed so dimension 0 is last).
Per vector: unit vectors u = v / max(|v|, 1e-7), cos = <u_0, u_1> clipped to [-1, 1]; where
1 - cos^2 <= eps^2 (eps = 1e-8: exactly colinear in float32) the two are lerped, elsewhere
(sin((1-t) theta) v_0 + sin(t theta) v_1) / sin theta on the unnormalised vectors. A zero vector
normalises to zero, so it counts as orthogonal to the other (mergekit does the same).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pydantic import Field

from engine.errors import ParameterError
from engine.merge.common import MethodParams, RequiredWeight, finish, prepare_inputs

NAME = "nuslerp"
PAPER = ("Goddard et al. (Arcee AI), NuSLERP: spherical interpolation of two models or of their "
         "task vectors, per tensor, row or column (mergekit `nuslerp`; no paper)")
REQUIRES_BASE = False
# The base_model is used when given (task-vector interpolation); a base listed among the
# models is that base, as in mergekit (read by the executor where it supports it).
OPTIONAL_BASE = True
MAX_MODELS = 2
DEFAULT_WEIGHT = "share"  # 0.5 and 0.5: t = 0.5, the midpoint

EPS = 1e-8        # colinear when 1 - cos^2 <= EPS^2 (mergekit's default)
NORM_FLOOR = 1e-7  # norms are clamped here before dividing (mergekit's)


class Params(MethodParams):
    nuslerp_row_wise: bool = Field(
        False, description="With nuslerp_flatten off: one angle per column (vectors along dimension 0) "
                           "instead of per row (mergekit `nuslerp_row_wise`).")
    nuslerp_flatten: bool = Field(
        True, description="Interpolate the whole tensor as one vector; off: per row or column "
                          "(mergekit `nuslerp_flatten`).")


class ModelParams(RequiredWeight):
    """``weight``: t = w_1 / (w_0 + w_1) is the position between the two models."""


def validate(params: Params, model_params: Sequence[ModelParams]) -> None:
    if len(model_params) != 2:
        raise ParameterError(
            "nuslerp merges exactly 2 models (recipe key `models`, besides `base_model`), "
            f"got {len(model_params)}")


def interpolation_factor(w0: float, w1: float) -> float:
    total = w0 + w1
    return 0.5 if abs(total) < 1e-6 else w1 / total


ROWS_PER_BLOCK = 1 << 12  # rows summed in float64 at a time (no float64 copy of a whole tensor)


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos of the angle between each pair of rows (last dim), as float64, shaped (..., 1).

    Near-colinear rows amplify a float32 dot product's rounding through acos (an error of 1e-7
    in cos near 0.99 moves theta by ~1e-6), so norms and dots are summed in float64, a block
    of rows at a time; norms are clamped at mergekit's floor before dividing."""
    a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    out = torch.empty(a2.shape[0], dtype=torch.float64, device=a.device)
    for start in range(0, a2.shape[0], ROWS_PER_BLOCK):
        x = a2[start:start + ROWS_PER_BLOCK].to(torch.float64)
        y = b2[start:start + ROWS_PER_BLOCK].to(torch.float64)
        na = x.norm(dim=-1).clamp(min=NORM_FLOOR)
        nb = y.norm(dim=-1).clamp(min=NORM_FLOOR)
        out[start:start + ROWS_PER_BLOCK] = (x * y).sum(dim=-1) / (na * nb)
    return out.clamp(-1.0, 1.0).reshape(*a.shape[:-1], 1)


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, row_wise: bool, flatten: bool) -> torch.Tensor:
    shape = v0.shape
    if flatten:
        a, b = v0.reshape(-1), v1.reshape(-1)
    elif row_wise and v0.dim() > 1:
        a, b = v0.transpose(0, -1), v1.transpose(0, -1)
    else:
        a, b = v0, v1
    cos = _cosines(a, b)
    colinear = (1 - cos * cos) <= EPS * EPS
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    # where colinear theta is 0 and this divides by 0; those entries are replaced by the lerp.
    # The coefficients are formed in float64 and applied in the inputs' dtype.
    sin = torch.sin(theta)
    c0 = torch.where(colinear, torch.full_like(theta, 1 - t), torch.sin((1 - t) * theta) / sin)
    c1 = torch.where(colinear, torch.full_like(theta, t), torch.sin(t * theta) / sin)
    out = c0.to(a.dtype) * a + c1.to(a.dtype) * b
    if not flatten and row_wise and v0.dim() > 1:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def flat_coefficients(t: float, aa: float, bb: float, ab: float) -> tuple[float, float]:
    """(c0, c1) of the flattened interpolation c0 v0 + c1 v1 from the float64 sums |v0|^2,
    |v1|^2 and <v0, v1> (the chunked kernel's first pass): the same rule as ``nuslerp``."""
    na = max(math.sqrt(aa), NORM_FLOOR)
    nb = max(math.sqrt(bb), NORM_FLOOR)
    cos = min(max(ab / (na * nb), -1.0), 1.0)
    if 1 - cos * cos <= EPS * EPS:
        return 1 - t, t
    theta = math.acos(cos)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def merge_tensor(
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    model_params: list[ModelParams],
    params: Params,
    *,
    name: str = "",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    base32, inputs = prepare_inputs(NAME, base, tensors, model_params, name=name, requires_base=False,
                                    min_models=2, max_models=2)
    t = interpolation_factor(model_params[0].weight, model_params[1].weight)
    options = {"row_wise": params.nuslerp_row_wise, "flatten": params.nuslerp_flatten}
    if base32 is None:
        out = nuslerp(t, inputs[0], inputs[1], **options)
    else:
        out = base32 + nuslerp(t, inputs[0] - base32, inputs[1] - base32, **options)
    return finish(out, NAME, name)
