"""Generalized task arithmetic: the engine behind task_arithmetic, ties, dare_*, breadcrumbs*, della*.

Each of those methods is one ``Variant`` declaration (engine/merge/methods/task_arithmetic_family.py):
its sparsification, whether signs are elected, its normalize/rescale defaults, its paper, as
mergekit declares its variants as constructor calls over one GeneralizedTaskArithmeticMerge.

Per tensor, as in mergekit's generalized_task_arithmetic.py:
  1. delta_i = W_i - W0, sparsified per model (density, gamma, epsilon) and optionally rescaled;
  2. weighted_i = w_i * delta_i;
  3. with a consensus method, keep per entry only the weighted deltas whose sign equals the
     elected sign ("sum": sign of sum_i weighted_i; "count": majority of signs; zero counts as
     positive) and divide by the sum of the kept weights (1 where none is kept); without one,
     sum everything and divide by sum_i w_i;
  4. the division happens only with normalize; then times lambda, plus W0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import torch
from pydantic import BaseModel, Field, create_model, model_validator

from engine.merge.common import (
    MethodParams,
    RequiredWeight,
    check_normalizable,
    density_field,
    finish,
    generator_for,
    prepare_inputs,
    seed_field,
    uniform_like,
    weights_column,
)
from engine.merge.sparsify import RescaleNorm, apply_mask, della_keep_probabilities, magnitude_mask, outlier_mask

Sparsification = Literal["magnitude", "random", "magnitude_outliers", "della_magprune"]
Consensus = Literal["sum", "count"]
RANDOM_SPARSIFICATIONS = ("random", "della_magprune")
NORMALIZE_DOC = "Divide the merged task vector by the sum of the weights used."
RESCALE_DOC = "Rescale sparsified task vectors (see rescale_norm)."


class GTAParams(MethodParams):
    """Global parameters shared by the task-vector family (mergekit names). Each variant's
    class sets its own defaults for normalize and rescale."""

    normalize: bool = Field(False, description=NORMALIZE_DOC)
    rescale: bool = Field(False, description=RESCALE_DOC)
    lambda_: float = Field(1.0, alias="lambda", description="Scale of the merged task vector before adding it to the base.")
    int8_mask: bool = Field(False, description="mergekit memory option (sign mask stored as int8); no effect on the result.")
    rescale_norm: RescaleNorm = Field(
        "l1",
        description="How `rescale` works: 'l1' matches the L1 norm of the unsparsified delta (mergekit); "
        "'keep_probability' divides survivors by their keep probability (DARE/DELLA papers). Not a mergekit parameter.",
    )


class ConsensusParams(GTAParams):
    consensus_method: Consensus = Field(
        "sum",
        description="Sign election: 'sum' = sign of the weighted sum (TIES paper, mergekit); "
        "'count' = majority of signs. Not a mergekit parameter (mergekit fixes 'sum').",
    )


class DensityModelParams(RequiredWeight):
    density: float = density_field()


class RandomDensityModelParams(DensityModelParams):
    seed: int | None = seed_field()


class BreadcrumbsModelParams(DensityModelParams):
    gamma: float = Field(0.01, ge=0.0, lt=1.0, description="Fraction of largest-magnitude entries removed as outliers (mergekit `gamma`).")


class DellaModelParams(RandomDensityModelParams):
    epsilon: float = Field(0.15, ge=0.0, lt=1.0, description="Half-width of the keep-probability range around density (mergekit `epsilon`).")

    @model_validator(mode="after")
    def _probabilities_in_range(self):
        if self.density < 1 and not (self.density - self.epsilon > 0 and self.density + self.epsilon < 1):
            raise ValueError(
                f"density {self.density:g} +/- epsilon {self.epsilon:g} must stay inside (0, 1) "
                "(keep probabilities range over density - epsilon .. density + epsilon)"
            )
        return self


# per-model parameters by sparsification: what each one reads (density, gamma, epsilon, seed)
MODEL_PARAMS: dict[Sparsification | None, type[RequiredWeight]] = {
    None: RequiredWeight,
    "magnitude": DensityModelParams,
    "random": RandomDensityModelParams,
    "magnitude_outliers": BreadcrumbsModelParams,
    "della_magprune": DellaModelParams,
}


def validate(method: str, params: GTAParams, model_params: Sequence[RequiredWeight]) -> None:
    if params.normalize:
        check_normalizable(method, [mp.weight for mp in model_params])


def elect_mask(weighted: torch.Tensor, method: Consensus) -> torch.Tensor:
    """Per entry, which of the N stacked weighted deltas agree with the elected sign."""
    signs = torch.sign(weighted)
    total = weighted.sum(dim=0) if method == "sum" else signs.sum(dim=0)
    elected = torch.where(total >= 0, 1.0, -1.0)
    # a zero (trimmed) entry has sign 0 and never agrees
    return signs == elected


def combine(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    consensus: Consensus | None,
    normalize: bool,
    lambda_: float,
) -> torch.Tensor:
    stacked = torch.stack(list(deltas))
    w = weights_column(weights, base)
    weighted = stacked * w
    if consensus is not None:
        agree = elect_mask(weighted, consensus)
        mixed = (weighted * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor = torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
    if normalize:
        mixed = mixed / divisor
    return base + lambda_ * mixed


def sparsify_delta(
    delta: torch.Tensor,
    kind: Sparsification | None,
    mp: RequiredWeight,
    params: GTAParams,
    generator: torch.Generator | None,
) -> torch.Tensor:
    rescale = params.rescale_norm if params.rescale else None
    density = getattr(mp, "density", 1.0)
    if kind is None or density >= 1:
        return delta  # mergekit returns the delta untouched at density >= 1 (no gamma cut either)
    if kind == "magnitude":
        return apply_mask(delta, magnitude_mask(delta, density), rescale, density)
    if kind == "magnitude_outliers":
        return apply_mask(delta, outlier_mask(delta, density, mp.gamma), rescale, density)
    if kind == "random":
        keep = uniform_like(delta, generator) < density
        return apply_mask(delta, keep, rescale, density)
    if kind == "della_magprune":
        probs = della_keep_probabilities(delta, density, mp.epsilon)
        keep = uniform_like(delta, generator) < probs
        return apply_mask(delta, keep, rescale, probs)
    raise ValueError(f"unknown sparsification {kind!r}")


def merge(
    method: str,
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    model_params: Sequence[RequiredWeight],
    params: GTAParams,
    *,
    name: str,
    generator: torch.Generator | None,
    sparsification: Sparsification | None,
    consensus: Consensus | None,
) -> torch.Tensor:
    validate(method, params, model_params)
    base32, inputs = prepare_inputs(method, base, tensors, model_params, name=name, requires_base=True)
    random = sparsification in RANDOM_SPARSIFICATIONS
    deltas = []
    for i, (t, mp) in enumerate(zip(inputs, model_params)):
        gen = generator_for(i, getattr(mp, "seed", None), generator, name) if random else None
        deltas.append(sparsify_delta(t - base32, sparsification, mp, params, gen))
    out = combine(
        base32,
        deltas,
        [mp.weight for mp in model_params],
        consensus=consensus,
        normalize=params.normalize,
        lambda_=params.lambda_,
    )
    return finish(out, method, name)


@dataclass(frozen=True)
class Variant:
    """One merge method of the family, declared as data.

    ``sparsification`` trims each task vector (None keeps it whole), ``consensus`` elects signs
    (the method then takes ``consensus_method``), ``normalize``/``rescale`` are the method's
    defaults. The registry serves it like a method module: ``params_class`` and
    ``model_params_class`` are the pydantic classes the pages render, ``merge_tensor`` and
    ``validate`` the calls."""

    name: str
    paper: str
    sparsification: Sparsification | None
    consensus: bool
    normalize: bool
    rescale: bool

    def __post_init__(self):
        if self.sparsification not in MODEL_PARAMS:
            raise TypeError(f"merge variant {self.name}: unknown sparsification {self.sparsification!r}")

    @property
    def randomized(self) -> bool:
        return self.sparsification in RANDOM_SPARSIFICATIONS

    @cached_property
    def params_class(self) -> type[BaseModel]:
        # named "Params" like a method module's class: the schema title the pages and
        # `methods --json` show stays the same for every method
        return create_model(
            "Params",
            __base__=ConsensusParams if self.consensus else GTAParams,
            __module__=__name__,
            normalize=(bool, Field(self.normalize, description=NORMALIZE_DOC)),
            rescale=(bool, Field(self.rescale, description=RESCALE_DOC)),
        )

    @property
    def model_params_class(self) -> type[RequiredWeight]:
        return MODEL_PARAMS[self.sparsification]

    def validate(self, params: GTAParams, model_params: Sequence[RequiredWeight]) -> None:
        validate(self.name, params, model_params)

    def merge_tensor(
        self,
        base: torch.Tensor | None,
        tensors: list[torch.Tensor],
        model_params: list[RequiredWeight],
        params: GTAParams,
        *,
        name: str = "",
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        return merge(
            self.name, base, tensors, model_params, params, name=name, generator=generator,
            sparsification=self.sparsification,
            consensus=params.consensus_method if self.consensus else None,
        )
