"""SoTU, sparse orthogonal task vectors: a sparse random mask per task, then plain addition.

Each task keeps a random `density` fraction of its delta (mask M_i); the result is
W0 + sum_i w_i M_i d_i. Sparse random masks overlap little, so the masked deltas are nearly
orthogonal and interfere little. With disjoint, one uniform draw u per entry is shared and
task i keeps the entries with u in [c_(i-1), c_i), c_i the running sum of densities: masks never
overlap (the densities must sum to at most 1). rescale divides survivors by density (DARE-style;
off by default).

What is and is not the paper's (no authors' code is public; only the abstract could be
retrieved): verified are sparse delta parameters per task, merged by fusing them so that the
sparse deltas are nearly orthogonal. NOT verified: how the sparsity is drawn (uniform random
masks here), the keep ratio (density 0.1 is our default, not a stated value), whether kept
entries are rescaled (off by default; `rescale` divides by the density), and whether masks are
disjoint (`disjoint`, ours). SoTU is a continual-learning method (fine-tune each task, then
merge the masked deltas); here only its merge step is applied to given fine-tunes.

Randomness: a per-model `seed` draws that model's mask from (seed, tensor name), independent of
input order; otherwise the caller's generator is used, in model order; otherwise a generator
seeded from (model position, tensor name). With disjoint masks the shared draw uses Params.seed,
else the caller's generator, else seed 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from engine.errors import ParameterError
from engine.merge.common import (
    DefaultWeight,
    MethodParams,
    derive_seed,
    finish,
    generator_for,
    prepare_inputs,
    seed_field,
    uniform_like,
    weights_column,
)

NAME = "sotu"
PAPER = "Ning et al., Sparse Orthogonal Parameters Tuning for Continual Learning (SoTU), 2024"
REQUIRES_BASE = True
RANDOMIZED = True


class Params(MethodParams):
    disjoint: bool = Field(False, description="Draw non-overlapping masks (densities must sum to at most 1).")
    rescale: bool = Field(False, description="Divide kept entries by the density (unbiased in expectation; whether the paper "
                          "rescales is not verified).")
    seed: int | None = Field(None, ge=0, description="Seed of the shared draw for disjoint masks.")


class ModelParams(DefaultWeight):
    density: float = Field(0.1, gt=0.0, le=1.0, description="Fraction of this task vector's entries kept (0.1 is our default; "
                           "the paper's keep ratio is not verified).")
    seed: int | None = seed_field()


def validate(params: Params, model_params: Sequence[ModelParams]) -> None:
    total = sum(mp.density for mp in model_params)
    if params.disjoint and total > 1 + 1e-9:
        raise ParameterError(f"{NAME}: disjoint masks need densities summing to at most 1, got {total:g}")


def task_masks(deltas: Sequence[torch.Tensor], model_params: Sequence[ModelParams], params: Params, generator: torch.Generator | None, name: str) -> list[torch.Tensor]:
    if params.disjoint:
        if params.seed is not None:
            shared = torch.Generator().manual_seed(derive_seed(params.seed, name))
        elif generator is not None:
            shared = generator
        else:
            shared = torch.Generator().manual_seed(derive_seed(0, name))
        u = uniform_like(deltas[0], shared)
        masks, start = [], 0.0
        for mp in model_params:
            end = start + mp.density
            if end > 1 - 1e-9:  # densities summing to 1 (up to rounding) must cover every entry
                end = 2.0
            masks.append((u >= start) & (u < end))
            start += mp.density
        return masks
    return [
        uniform_like(d, generator_for(i, mp.seed, generator, name)) < mp.density
        for i, (d, mp) in enumerate(zip(deltas, model_params))
    ]


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
    base32, inputs = prepare_inputs(NAME, base, tensors, model_params, name=name, requires_base=True)
    deltas = [t - base32 for t in inputs]
    masks = task_masks(deltas, model_params, params, generator, name)
    kept = torch.stack([d * m / (mp.density if params.rescale else 1.0) for d, m, mp in zip(deltas, masks, model_params)])
    w = weights_column([mp.weight for mp in model_params], base32)
    return finish(base32 + (kept * w).sum(dim=0), NAME, name)
