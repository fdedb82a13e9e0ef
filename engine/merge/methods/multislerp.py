"""Multi-SLERP: a weighted barycentre of any number of models on the hypersphere.

As mergekit's `multislerp` (mergekit/merge_methods/multislerp.py, 0.1.5), per tensor, with the
whole tensor as one vector v_i (the task vector W_i - W0 when a base model is given):
  1. weights w_i, divided by their sum with normalize_weights (the default);
  2. unit vectors u_i = v_i / (|v_i| + eps); their weighted mean m = sum_i w_i u_i, normalised;
  3. each u_i is projected onto the plane tangent at m: g_i = u_i - <u_i, m> m, and
     g = sum_i w_i g_i;
  4. back onto the sphere: r = m cos|g| + g sin|g| / |g| (with |g| + eps in place of |g|);
  5. the result's length is the weighted mean of the lengths, sum_i w_i |v_i|; plus W0.
One model is returned as it is.

When the unit vectors cancel (|m| < eps: every task vector zero, or antipodal vectors with
balancing weights) the sphere gives no direction. mergekit then lerps two models and raises
an error for three or more; here the weighted linear combination sum_i w_i v_i (+ W0) is used
for any number of models (ours): zero task vectors, common for frozen tensors such as
embeddings, then give the base, instead of failing the merge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pydantic import Field

from engine.merge.common import MethodParams, RequiredWeight, check_normalizable, finish, prepare_inputs

NAME = "multislerp"
PAPER = ("Goddard, Multi-SLERP: barycentric interpolation on the hypersphere "
         "(goddard.blog/posts/multislerp-wow-what-a-cool-idea; mergekit `multislerp`)")
REQUIRES_BASE = False
# The base_model is used when given (the task vectors are interpolated); a base listed among
# the models is that base, as in mergekit (read by the executor where it supports it).
OPTIONAL_BASE = True
DEFAULT_WEIGHT = "share"


class Params(MethodParams):
    normalize_weights: bool = Field(True, description="Divide the weights by their sum (mergekit `normalize_weights`).")
    eps: float = Field(1e-8, gt=0.0, description="Added to norms before dividing by them (mergekit `eps`).")


ModelParams = RequiredWeight


def validate(params: Params, model_params: Sequence[ModelParams]) -> None:
    if params.normalize_weights:
        check_normalizable(NAME, [mp.weight for mp in model_params])


def gram_coefficients(gram: torch.Tensor, weights: Sequence[float], params: Params) -> torch.Tensor:
    """k (float64, one per model) with result = sum_i k_i v_i, from the float64 Gram matrix
    G_ij = <v_i, v_j> (the chunked kernel's first pass; two models or more).

    Every step above is linear in the v_i given a few scalars, so it is carried out on their
    coefficients: u_i = v_i / (|v_i| + eps); m = sum_i a_i v_i with a_i = w_i / (|v_i| + eps);
    <u_i, m> = (G a)_i / (|v_i| + eps); g and the result are combinations of the same kind, and
    their norms are c^T G c. (Mathematically g is zero: sum_i w_i <u_i, m> equals |m| before it
    is normalised. mergekit's float32 pass leaves rounding noise there, about 1e-7 of |m|; the
    coefficients carry float64 noise instead.)"""
    g64 = gram.to(torch.float64)
    w = torch.tensor(list(weights), dtype=torch.float64)
    if params.normalize_weights:
        w = w / w.sum()
    eps = params.eps
    norms = torch.sqrt(torch.diagonal(g64).clamp(min=0.0))
    a = w / (norms + eps)
    mean_norm = math.sqrt(max(float(a @ g64 @ a), 0.0))
    if mean_norm < eps:  # no direction on the sphere: the weighted linear combination
        return w
    m = a / mean_norm
    dots = (g64 @ m) / (norms + eps)            # <u_i, m>
    g = a - float((w * dots).sum()) * m          # sum_i w_i (u_i - <u_i, m> m)
    g_norm = math.sqrt(max(float(g @ g64 @ g), 0.0)) + eps
    return (m * math.cos(g_norm) + g * (math.sin(g_norm) / g_norm)) * float((norms * w).sum())


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
    base32, inputs = prepare_inputs(NAME, base, tensors, model_params, name=name, requires_base=False)
    if len(inputs) == 1:
        return finish(inputs[0], NAME, name)
    shape, eps = inputs[0].shape, params.eps
    stacked = torch.stack(inputs)
    if base32 is not None:
        stacked = stacked - base32
    flat = stacked.reshape(len(inputs), -1)
    w = torch.tensor([mp.weight for mp in model_params], dtype=flat.dtype, device=flat.device)
    if params.normalize_weights:
        w = w / w.sum()
    norms = flat.norm(dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(dim=0)
    mean_norm = mean.norm()
    if mean_norm < eps:  # no direction on the sphere: the weighted linear combination (see above)
        out = (flat * w[:, None]).sum(dim=0)
    else:
        mean = mean / mean_norm
        tangents = units - (units @ mean)[:, None] * mean
        g = (tangents * w[:, None]).sum(dim=0)
        g_norm = g.norm() + eps
        out = mean * torch.cos(g_norm) + g * (torch.sin(g_norm) / g_norm)
        out = out * (norms[:, 0] * w).sum()
    out = out.reshape(shape)
    if base32 is not None:
        out = out + base32
    return finish(out, NAME, name)
