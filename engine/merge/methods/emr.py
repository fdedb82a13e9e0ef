"""EMR-Merging: one elected task vector plus a bit mask and a scalar per task.

Elect: sign s = sign(sum_i d_i) per entry (a sum of exactly zero counts as negative, as in
the authors' code); unified vector d_uni = s * max over tasks agreeing with s of |d_i|.
Per task: mask M_i = (d_i * d_uni > 0) and rescaler l_i = sum|d_i| / sum|M_i * d_uni|, so
the rebuilt task vector l_i M_i d_uni has the L1 mass of the original. Task i's model is
W0 + l_i M_i d_uni.

The authors compute l_i over the whole model (sums of per-tensor means). A single tensor only
knows its own sums; EmrDecomposition carries them (task_abs_sum, masked_abs_sum) so a caller
streaming a model can aggregate model-wide rescalers and pass them to emr_rebuild.
merge_tensor returns task `task`'s model, or with task unset the mean of the N rebuilt models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pydantic import Field

from engine.errors import ParameterError
from engine.merge.common import MethodParams, NoModelParams, finish, pack_bits, prepare_inputs, unpack_bits

NAME = "emr"
PAPER = "Huang et al., EMR-Merging: Tuning-Free High-Performance Model Merging, NeurIPS 2024 (arXiv:2405.17461)"
REQUIRES_BASE = True


class Params(MethodParams):
    task: int | None = Field(None, ge=0, description="Rebuild this task's model (0-based input position); empty = mean of all rebuilt task models.")


ModelParams = NoModelParams


def validate(params: Params, model_params: Sequence[ModelParams]) -> None:
    if params.task is not None and params.task >= len(model_params):
        raise ParameterError(f"{NAME}: task {params.task} out of range for {len(model_params)} models")


@dataclass(frozen=True)
class EmrDecomposition:
    unified: torch.Tensor  # d_uni, float32, the tensor's shape
    packed_masks: tuple[torch.Tensor, ...]  # per task: uint8, bit-packed M_i (pack_bits order)
    task_abs_sum: torch.Tensor  # (N,) sum |d_i| over this tensor
    masked_abs_sum: torch.Tensor  # (N,) sum |M_i * d_uni| over this tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.unified.shape)

    @property
    def scales(self) -> torch.Tensor:
        """Per-tensor rescalers l_i (1 where a task's mask is empty: nothing to scale)."""
        den = self.masked_abs_sum
        return torch.where(den > 0, self.task_abs_sum / torch.where(den > 0, den, torch.ones_like(den)), torch.ones_like(den))

    def mask(self, task: int) -> torch.Tensor:
        return unpack_bits(self.packed_masks[task], self.shape).to(self.unified.device)


def emr_decompose(deltas: Sequence[torch.Tensor]) -> EmrDecomposition:
    """Elect the unified vector and the per-task masks and L1 sums from N float32 deltas."""
    stacked = torch.stack(list(deltas))
    sign = torch.where(stacked.sum(dim=0) > 0, 1.0, -1.0)
    agree = stacked * sign > 0
    unified = (stacked.abs() * agree).amax(dim=0) * sign
    masks = agree  # where any task agrees with the sign, d_uni is nonzero with that sign
    task_abs_sum = stacked.abs().reshape(len(stacked), -1).sum(dim=1)
    masked_abs_sum = (unified.abs() * masks).reshape(len(stacked), -1).sum(dim=1)
    return EmrDecomposition(
        unified=unified,
        packed_masks=tuple(pack_bits(m) for m in masks),
        task_abs_sum=task_abs_sum,
        masked_abs_sum=masked_abs_sum,
    )


def emr_rebuild(base: torch.Tensor, decomposition: EmrDecomposition, task: int, scale: float | None = None) -> torch.Tensor:
    """Task `task`'s tensor: base + l * M_task * d_uni (l from this tensor unless `scale` is given)."""
    if not 0 <= task < len(decomposition.packed_masks):
        raise ParameterError(f"{NAME}: task {task} out of range for {len(decomposition.packed_masks)} tasks")
    lam = float(decomposition.scales[task]) if scale is None else float(scale)
    # float32 at least; a float64 base stays float64 (float32 would round it)
    return base.to(torch.promote_types(base.dtype, torch.float32)) + lam * (decomposition.mask(task) * decomposition.unified)


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
    dec = emr_decompose([t - base32 for t in inputs])
    if params.task is not None:
        out = emr_rebuild(base32, dec, params.task)
    else:
        out = torch.stack([emr_rebuild(base32, dec, i) for i in range(len(inputs))]).mean(dim=0)
    return finish(out, NAME, name)
