"""A random mask, the baseline Safe Delta and IRR must beat at equal kept share (ours).

Per repaired linear, ``round(share * entries)`` entries of the delta, drawn uniformly without
replacement (seeded per tensor), keep their fine-tuned value; the others take the aligned
value; no compensation. ``share`` is ``keep_share``, or per matrix the ``kept_share`` that a
reference repair recorded in its manifest (``match_manifest``), so the comparison is at the
reference's exact share matrix by matrix. Tensors that are not repaired follow
``non_linear_policy`` (aligned, as Safe Delta; finetuned, as IRR)."""

from __future__ import annotations

import hashlib
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

NAME = "random_mask"
PAPER = "baseline (ours): a uniformly random mask of the delta at a given or matched share"
STATS: tuple[str, ...] = ()


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    keep_share: float = Field(0.5, ge=0.0, le=1.0, description="Share of each matrix's delta "
                                                               "entries kept.")
    match_manifest: str | None = Field(None, description="A repair output's manifest: keep, "
                                       "matrix by matrix, the share its method kept.")
    seed: int = Field(0, ge=0, description="Seed of the draws (per tensor).")
    tensors: Literal["decoder_linears", "all_linears"] = Field(
        "decoder_linears", description="Which linears are masked.")
    non_linear_policy: Literal["aligned", "finetuned"] = Field(
        "aligned", description="Tensors not masked: from the aligned model or the fine-tune.")


def target_names(params: Params, layout) -> set[str]:
    names = set(layout.decoder_linears)
    if params.tensors == "all_linears":
        names |= set(layout.other_linears)
    return names


def tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"random_mask:{seed}:{name}".encode()).digest()[:8], "big") >> 1


def repair_tensor(inputs, params: Params):
    if not inputs.target:
        return (inputs.aligned if params.non_linear_policy == "aligned" else inputs.finetuned), None
    share = params.keep_share if inputs.share is None else inputs.share
    numel = inputs.aligned.numel()
    count = int(round(share * numel))
    generator = torch.Generator().manual_seed(tensor_seed(params.seed, inputs.name))
    chosen = torch.randperm(numel, generator=generator)[:count]
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[chosen] = True
    mask = mask.reshape(inputs.aligned.shape).to(inputs.aligned.device)
    out = torch.where(mask, inputs.finetuned, inputs.aligned)
    return out, {"kept_share": count / numel}
