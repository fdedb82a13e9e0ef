"""RAM (Reinforced Agent Merging): average the updates models share, keep the unique ones whole.

As mergekit's `ram` (mergekit/merge_methods/ram.py, 0.1.5), per tensor, task vectors
d_i = W_i - W0: an entry of d_i counts as changed when |d_i| > epsilon (smaller changes are
dropped). Per entry, c = how many models changed it:
  c = 0 -> W0;  c = 1 -> W0 + that model's change, undiluted;  c > 1 -> W0 + the mean of the
  c changes.
RL fine-tuning leaves sparse, mostly disjoint task vectors, which a plain average would divide
by N. The shared/unique split here is also what ramplus_tl rescales.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pydantic import Field

from engine.merge.common import MethodParams, NoModelParams, finish, prepare_inputs

NAME = "ram"
PAPER = ("Yuan et al., Behavior Knowledge Merge in Reinforced Agentic Models (RAM), 2026 "
         "(arXiv:2601.13572; mergekit `ram`)")
REQUIRES_BASE = True


def epsilon_field():
    return Field(1e-5, ge=0.0, description="An entry of a task vector counts as changed when its magnitude "
                                           "exceeds this (mergekit `epsilon`).")


class Params(MethodParams):
    epsilon: float = epsilon_field()


ModelParams = NoModelParams


def validate(params: Params, model_params: Sequence[ModelParams]) -> None:
    return None


@dataclass
class Split:
    """Task vectors (N, entries) with only their changed entries, and how each entry is shared."""

    changes: torch.Tensor   # d_i where |d_i| > epsilon, else 0
    changed: torch.Tensor   # bool (N, entries)
    counts: torch.Tensor    # (entries,) models that changed the entry
    unique: torch.Tensor    # bool (entries,): exactly one model changed it
    shared: torch.Tensor    # bool (entries,): two or more did


def split(base: torch.Tensor, inputs: Sequence[torch.Tensor], epsilon: float) -> Split:
    deltas = torch.stack([t.reshape(-1) for t in inputs]) - base.reshape(-1)
    changed = deltas.abs() > epsilon
    counts = changed.sum(dim=0)
    return Split(deltas * changed, changed, counts, counts == 1, counts > 1)


def combine(base: torch.Tensor, s: Split, unique_scale: torch.Tensor | None = None) -> torch.Tensor:
    """W0 + unique changes (times each model's ``unique_scale``) + the mean of shared ones."""
    unique = s.changes * s.unique
    if unique_scale is not None:
        unique = unique * unique_scale[:, None]
    shared = s.changes * s.shared / s.counts.clamp(min=1)
    return base + (unique + shared).sum(dim=0).reshape(base.shape)


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
    return finish(combine(base32, split(base32, inputs, params.epsilon)), NAME, name)
