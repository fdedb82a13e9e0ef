"""RAM+ (tensor-local): RAM with each model's unique updates scaled up by how much it overlaps.

As mergekit's `ramplus_tl` (mergekit/merge_methods/ram.py, 0.1.5): the split of ``ram`` (an
entry of d_i = W_i - W0 changed when |d_i| > epsilon; shared when two or more models changed
it, unique when one did). Per model i, counted within this tensor ("tensor-local"; the paper
counts over the whole model):
  rho_i = (entries i changed that are shared) / max(entries i changed that are unique, epsilon)
  lambda_i = 1 + r * clamp(rho_i, 0, alpha)
and the result is W0 + sum_i lambda_i (unique changes of i) + the mean of the shared changes.
A model whose updates are mostly shared loses the most to averaging elsewhere, so its unique
updates are boosted, by at most a factor 1 + r * alpha.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from engine.merge.common import MethodParams, NoModelParams, finish, prepare_inputs
from engine.merge.methods.ram import combine, epsilon_field, split

NAME = "ramplus_tl"
PAPER = ("Yuan et al., Behavior Knowledge Merge in Reinforced Agentic Models (RAM+), 2026 "
         "(arXiv:2601.13572; tensor-local, mergekit `ramplus_tl`)")
REQUIRES_BASE = True


class Params(MethodParams):
    r: float = Field(0.1, ge=0.0, description="Rescaling strength of the unique updates (mergekit `r`).")
    alpha: float = Field(0.2, ge=0.0, description="Cap on the overlap ratio rho (mergekit `alpha`): unique "
                                                  "updates grow by at most 1 + r * alpha.")
    epsilon: float = epsilon_field()


ModelParams = NoModelParams


def validate(params: Params, model_params: Sequence[ModelParams]) -> None:
    return None


def overlap_counts(s) -> torch.Tensor:
    """int64 [2, N]: per model, the entries it changed that are shared, and those unique (sums
    over slices of a tensor add up to the whole tensor's, exactly)."""
    return torch.stack([(s.changed & s.shared).sum(dim=1), (s.changed & s.unique).sum(dim=1)])


def unique_scales(s, r: float, alpha: float, epsilon: float, dtype: torch.dtype) -> torch.Tensor:
    """lambda_i = 1 + r * clamp(shared_i / max(unique_i, epsilon), 0, alpha) per model."""
    return scales_from_counts(overlap_counts(s), r, alpha, epsilon, dtype)


def scales_from_counts(counts: torch.Tensor, r: float, alpha: float, epsilon: float,
                       dtype: torch.dtype) -> torch.Tensor:
    """``unique_scales`` from ``overlap_counts`` (of the whole tensor)."""
    shared, unique = counts[0].to(dtype), counts[1].to(dtype)
    rho = shared / unique.clamp(min=epsilon) if epsilon > 0 else shared / unique
    # epsilon 0 and no unique entry: 0/0 or x/0; no unique entry is then scaled anyway
    rho = torch.nan_to_num(rho, nan=0.0, posinf=alpha)
    return 1 + r * rho.clamp(0.0, alpha)


def merge_tensor(
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    model_params: list[ModelParams],
    params: Params,
    *,
    name: str = "",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    base32, inputs = prepare_inputs(NAME, base, tensors, model_params, name=name, requires_base=True)
    s = split(base32, inputs, params.epsilon)
    scales = unique_scales(s, params.r, params.alpha, params.epsilon, base32.dtype)
    return finish(combine(base32, s, scales), NAME, name)
