"""EMR-Merging: one elected task vector plus a bit mask and a scalar per task.

Elect: sign s = sign(sum_i d_i) per entry (a sum of exactly zero counts as negative, as in
the authors' code); unified vector d_uni = s * max over tasks agreeing with s of |d_i|.
Per task: mask M_i = (d_i * d_uni > 0). Task i's model is W0 + l_i M_i d_uni.

Rescaler l_i (``rescale``):
  - ``model`` (the paper's, the default): one scalar per task for the whole model, as the
    authors' code computes it (harveyhuang18/EMR_Merging, ``emr_merge``: merge_vit and
    merge_lm alike): l_i = sum over tensors of mean|d_i| / sum over tensors of mean|M_i d_uni|,
    per-tensor MEANS summed over tensors (a small tensor weighs as much as a large one per
    entry of its own, not per entry of the model). Each tensor's (mean|d_i|, mean|M_i d_uni|)
    is its ``model_statistic``; the merge path sums them over every tensor in a first pass
    (``MergeSpec.first_pass``) and hands the sums to ``merge_tensor`` as ``model_stat``.
  - ``per_tensor`` (our option, not the paper's): l_i from this tensor's own sums,
    sum|d_i| / sum|M_i d_uni|, so every rebuilt tensor has its task vector's L1 mass.
A task whose masked mass is zero (empty masks) gets l_i = 1: there is nothing to scale (the
authors' code would divide by zero). Called on one tensor without ``model_stat`` (a direct
call, not through a merge path), that tensor is the whole model: both rules then agree.

merge_tensor returns task `task`'s model, or with task unset the mean of the N rebuilt models
(our choice for a single output: the paper keeps the N task-specific models apart).
EmrDecomposition carries one tensor's unified vector, packed masks and sums for callers that
store the decomposition (the masks are 1 bit an entry).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from engine.errors import ParameterError
from engine.merge.common import MethodParams, NoModelParams, finish, pack_bits, prepare_inputs, unpack_bits

NAME = "emr"
PAPER = "Huang et al., EMR-Merging: Tuning-Free High-Performance Model Merging, NeurIPS 2024 (arXiv:2405.17461)"
REQUIRES_BASE = True


class Params(MethodParams):
    task: int | None = Field(None, ge=0, description="Rebuild this task's model (0-based input position); empty = mean of all rebuilt task models.")
    rescale: Literal["model", "per_tensor"] = Field(
        "model", description="model: one rescaler per task for the whole model, sum of per-tensor mean|d_i| over sum of "
        "mean|M_i d_uni| (the paper's, as the authors' code); per_tensor: each tensor's own L1 ratio (our option).")


ModelParams = NoModelParams


def validate(params: Params, model_params: Sequence[ModelParams]) -> None:
    if params.task is not None and params.task >= len(model_params):
        raise ParameterError(f"{NAME}: task {params.task} out of range for {len(model_params)} models")


@dataclass(frozen=True)
class EmrDecomposition:
    unified: torch.Tensor  # d_uni, float32, the tensor's shape
    packed_masks: tuple[torch.Tensor, ...]  # per task: uint8, bit-packed M_i (pack_bits order)
    task_abs_sum: torch.Tensor  # (N,) float64, sum |d_i| over this tensor
    masked_abs_sum: torch.Tensor  # (N,) float64, sum |M_i * d_uni| over this tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.unified.shape)

    @property
    def numel(self) -> int:
        return self.unified.numel()

    @property
    def scales(self) -> torch.Tensor:
        """Per-tensor rescalers l_i (1 where a task's mask is empty: nothing to scale)."""
        return ratio(self.task_abs_sum, self.masked_abs_sum)

    def mask(self, task: int) -> torch.Tensor:
        return unpack_bits(self.packed_masks[task], self.shape).to(self.unified.device)


def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den per task, 1 where den is 0."""
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.ones_like(den))


def emr_decompose(deltas: Sequence[torch.Tensor]) -> EmrDecomposition:
    """Elect the unified vector and the per-task masks and L1 sums from N float32 deltas."""
    stacked = torch.stack(list(deltas))
    sign = torch.where(stacked.sum(dim=0) > 0, 1.0, -1.0)
    agree = stacked * sign > 0
    unified = (stacked.abs() * agree).amax(dim=0) * sign
    masks = agree  # where any task agrees with the sign, d_uni is nonzero with that sign
    n = len(stacked)
    task_abs_sum = stacked.abs().reshape(n, -1).sum(dim=1, dtype=torch.float64)
    masked_abs_sum = (unified.abs() * masks).reshape(n, -1).sum(dim=1, dtype=torch.float64)
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


def tensor_means(decomposition: EmrDecomposition) -> torch.Tensor:
    """(2, N) float64: this tensor's mean|d_i| and mean|M_i d_uni| (the authors' per-tensor terms)."""
    n = max(1, decomposition.numel)
    return torch.stack([decomposition.task_abs_sum, decomposition.masked_abs_sum]).cpu() / n


def model_rescalers(model_stat: torch.Tensor) -> torch.Tensor:
    """Model-wide l_i from the (2, N) per-tensor means summed over the model's tensors."""
    return ratio(model_stat[0], model_stat[1])


def uses_model_statistic(params: Params) -> bool:
    return params.rescale == "model"


def model_statistic(
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    model_params: list[ModelParams],
    params: Params,
    *,
    name: str = "",
) -> torch.Tensor:
    """This tensor's part of the model-wide rescalers: (2, N) float64, summed over tensors."""
    base32, inputs = prepare_inputs(NAME, base, tensors, model_params, name=name, requires_base=True)
    return tensor_means(emr_decompose([t - base32 for t in inputs]))


def merge_tensor(
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    model_params: list[ModelParams],
    params: Params,
    *,
    name: str = "",
    generator: torch.Generator | None = None,
    model_stat: torch.Tensor | None = None,
) -> torch.Tensor:
    validate(params, model_params)
    base32, inputs = prepare_inputs(NAME, base, tensors, model_params, name=name, requires_base=True)
    dec = emr_decompose([t - base32 for t in inputs])
    if params.rescale == "model" and model_stat is not None:
        if tuple(model_stat.shape) != (2, len(inputs)):
            raise ParameterError(f"{NAME}: model-wide statistic of shape {tuple(model_stat.shape)} for "
                                 f"{len(inputs)} tasks", tensor=name or None)
        scales = model_rescalers(model_stat).tolist()
    else:  # per_tensor, or this tensor alone is the model (its summed means are its own)
        scales = dec.scales.tolist()
    if params.task is not None:
        out = emr_rebuild(base32, dec, params.task, scales[params.task])
    else:
        out = torch.stack([emr_rebuild(base32, dec, i, scales[i]) for i in range(len(inputs))]).mean(dim=0)
    return finish(out, NAME, name)
