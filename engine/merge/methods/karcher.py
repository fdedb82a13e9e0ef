"""Karcher mean: the Riemannian centre of mass of the models' directions on the unit sphere.

As mergekit's `karcher` (mergekit/merge_methods/karcher.py, 0.1.5), per tensor, every input
weighted equally (alpha_i = 1/N). The inputs are the models and, when a base model is given,
the base too (mergekit adds the base_model to the inputs of a method that takes no base role;
it comes last):
  1. norms n_i = |W_i| and unit vectors u_i = W_i / n_i (the whole tensor as one vector);
     inputs with n_i <= tol take no part in the direction (all of them: the result is zero);
  2. start at the normalised weighted mean of the units (the first unit when that mean is
     shorter than tol), weights renormalised over the inputs taking part;
  3. fixed-point iteration, at most max_iter times: the log map of every unit at the current
     mean, theta_i = arccos <m, u_i>, v = sum_i alpha_i theta_i / sin(theta_i) (u_i - <m, u_i> m)
     (units within tol of m skipped); stop when |v| < tol; else step along the geodesic,
     m <- cos|v| m + sin|v| v / |v|, renormalised;
  4. the result is m times the mean norm sum_i alpha_i n_i (every input counted).
One input is returned as it is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pydantic import Field

from engine.merge.common import MethodParams, NoModelParams, finish, prepare_inputs

NAME = "karcher"
PAPER = ("Wang, Ye & Yin, Functionality-Oriented LLM Merging on the Fisher-Rao Manifold, 2026 "
         "(arXiv:2603.04972; Karcher mean on the sphere, mergekit `karcher`)")
REQUIRES_BASE = False
# A base_model given is one more input, averaged like the models; a base listed among the
# models is that same input, not a second one (read by the executor where it supports it).
OPTIONAL_BASE = True


class Params(MethodParams):
    max_iter: int = Field(10, ge=0, description="Most fixed-point iterations (mergekit `max_iter`).")
    tol: float = Field(1e-5, gt=0.0, description="Convergence and degeneracy tolerance: stop when the "
                                                 "tangent step is shorter (mergekit `tol`).")


ModelParams = NoModelParams


def validate(params: Params, model_params: Sequence[ModelParams]) -> None:
    return None


def karcher_mean(inputs: Sequence[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    shape = inputs[0].shape
    flat = torch.stack([t.reshape(-1) for t in inputs])
    n = flat.shape[0]
    alpha = 1.0 / n
    norms = flat.norm(dim=1)
    valid = norms > tol
    if not bool(valid.any()):
        return torch.zeros(shape, dtype=flat.dtype, device=flat.device)
    units = flat[valid] / norms[valid, None]
    weights = torch.full((units.shape[0],), 1.0 / units.shape[0], dtype=flat.dtype, device=flat.device)
    mean = weights @ units
    mean_norm = mean.norm()
    mean = units[0].clone() if mean_norm < tol else mean / mean_norm
    for _ in range(max_iter):
        dots = (units @ mean).clamp(-1.0, 1.0)
        theta = torch.arccos(dots)
        moving = theta >= tol  # units already at the mean contribute nothing (and 0/0)
        if not bool(moving.any()):
            break
        scale = torch.where(moving, weights * theta / torch.sin(torch.where(moving, theta, torch.ones_like(theta))),
                            torch.zeros_like(theta))
        tangent = scale @ units - (scale * dots).sum() * mean  # sum_i s_i (u_i - <m, u_i> m)
        step = tangent.norm()
        if step < tol:
            break
        mean = torch.cos(step) * mean + torch.sin(step) * (tangent / step)
        length = mean.norm()
        if length > tol:
            mean = mean / length
    return (alpha * norms.sum() * mean).reshape(shape)


def gram_coefficients(gram: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """c (float64, one per input) with result = sum_i c_i W_i, from the float64 Gram matrix
    G_ij = <W_i, W_j> of the inputs (the chunked kernel's first pass).

    The mean stays in the span of the units at every step (its start is a combination of them,
    the tangent is one, the geodesic step mixes the two), so the iteration is carried out on
    its coefficients k, with m = sum_i k_i u_i: <m, u_j> = (k G_u)_j and |x|^2 = x G_u x for a
    combination x, G_u the units' Gram matrix G_ij / (n_i n_j). The steps and their stopping
    rules are ``karcher_mean``'s; it runs in float32 over the entries (mergekit's arithmetic),
    this in float64 over N coefficients, so the two differ by float32 rounding (the angles of
    nearly parallel inputs, arccos near 1, the most)."""
    g64 = gram.to(torch.float64)
    n = g64.shape[0]
    coeffs = torch.zeros(n, dtype=torch.float64)
    norms = torch.sqrt(torch.diagonal(g64).clamp(min=0.0))
    valid = norms > tol
    if not bool(valid.any()):
        return coeffs
    if n == 1:  # one input is returned as it is
        return torch.ones(1, dtype=torch.float64)
    idx = torch.nonzero(valid).flatten()
    nv = norms[idx]
    gu = g64[idx][:, idx] / (nv[:, None] * nv[None, :])

    def length(x: torch.Tensor) -> float:
        return math.sqrt(max(float(x @ gu @ x), 0.0))

    weights = torch.full((len(idx),), 1.0 / len(idx), dtype=torch.float64)
    mean_norm = length(weights)
    if mean_norm < tol:
        k = torch.zeros_like(weights)
        k[0] = 1.0
    else:
        k = weights / mean_norm
    for _ in range(max_iter):
        dots = (gu @ k).clamp(-1.0, 1.0)
        theta = torch.arccos(dots)
        moving = theta >= tol
        if not bool(moving.any()):
            break
        scale = torch.where(moving, weights * theta / torch.sin(torch.where(moving, theta, torch.ones_like(theta))),
                            torch.zeros_like(theta))
        tangent = scale - float((scale * dots).sum()) * k
        step = length(tangent)
        if step < tol:
            break
        k = math.cos(step) * k + math.sin(step) * (tangent / step)
        size = length(k)
        if size > tol:
            k = k / size
    coeffs[idx] = float(norms.sum()) / n * k / nv
    return coeffs


def merge_tensor(
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    model_params: list[ModelParams],
    params: Params,
    *,
    name: str = "",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    base32, inputs = prepare_inputs(NAME, base, tensors, model_params, name=name, requires_base=False)
    if base32 is not None:
        inputs = [*inputs, base32]
    if len(inputs) == 1:
        return finish(inputs[0], NAME, name)
    out = karcher_mean(inputs, params.max_iter, params.tol)
    return finish(out, NAME, name)

