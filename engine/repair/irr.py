"""IRR: Identify, Remove, Recalibrate (Wu et al., "Separate the Wheat from the Chaff", Findings
of ACL 2025, arXiv:2412.11041; the authors' code, an adapted SparseGPT).

Per target linear, on the fine-tune's delta ``D = W_f - W_a`` (out x in):

- **Identify.** The safety vector ``v = W_a - W_u`` (aligned minus an unaligned model: the
  aligned model fine-tuned on harmful compliance) says which way safety points. Delta entries
  whose sign differs from ``v``'s (``torch.sign``: zero is a sign of its own) conflict with it.
  Their safety importance is the empirical Fisher of the aligned model on its own refusals
  (squared batch gradients, batches of 8, ``engine.repair.statistics``).
- **Remove.** Per block of ``blocksize`` columns, the conflicting entries sorted by Fisher
  (ascending, stable); those ranked at or after ``keep_conflicting * |C|`` are removed (set to
  0): the default 0 removes every conflicting entry (the code's "Remove_All"), 1 removes none.
  ``remove_more``: every entry is ranked, conflicting ones by F and agreeing ones by -F, and
  those at or after ``keep_conflicting * entries`` go (conflicting first, highest F first, then
  the agreeing entries of lowest F).
- **Recalibrate.** The removal's error is pushed into the retained entries column by column
  with the OBS update of the task Hessian (the fine-tune's inputs to this layer on its own task
  data, true-sequential: the layers and linears before this one already repaired), so the
  layer's outputs on task data stay near the fine-tune's. ``recalibrate: false`` is the
  ablation (plain removal). Dead columns (``H_jj = 0``) lose their delta, as the authors do.

As in the authors' code the signs, and so the conflict set, of a block are read from the
delta after the compensation of earlier blocks. The output is ``W_a + D'``: removed entries
equal ``W_a`` exactly. Tensors that are not targets keep their fine-tuned values.
``safety_vector: alignment_delta`` (ours, a labelled fallback for a zoo with no unaligned
model) takes ``v = W_a - (the aligned model's own base)``: the alignment delta, which also
carries whatever else alignment taught.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from engine.repair.obs import condition, inverse_upper_factor, output_drift

NAME = "irr"
PAPER = ("Wu et al., Separate the Wheat from the Chaff: A Post-Hoc Approach to Safety "
         "Re-Alignment for Fine-Tuned Language Models, Findings of ACL 2025 (arXiv:2412.11041)")
STATS = ("safety_vector", "fisher", "task_hessian")


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    keep_conflicting: float = Field(0.0, ge=0.0, le=1.0, description="The paper's 'sparsity': "
                                    "share of the conflicting entries (lowest Fisher first) kept; "
                                    "0 removes every conflicting entry.")
    remove_more: bool = Field(False, description="IRR_more: rank every entry (conflicting by F, "
                                                 "agreeing by -F) and remove from the top.")
    recalibrate: bool = Field(True, description="OBS recalibration of the retained entries on "
                                                "task data (off: the ablation, plain removal).")
    targets: Literal["all_linears", "qv"] = Field(
        "all_linears", description="Repaired linears: every linear of the decoder layers (full "
                                   "fine-tunes) or q_proj and v_proj (the authors' LoRA runs).")
    blocksize: int = Field(128, ge=1, le=1 << 20, description="Columns per block (published "
                                                              "runs: 128).")
    percdamp: float = Field(0.01, gt=0.0, le=10.0, description="Damping: this share of the "
                                                               "Hessian's mean diagonal.")
    n_fisher: int = Field(128, ge=1, le=100_000, description="Refusal examples for the Fisher.")
    fisher_batch_size: int = Field(8, ge=1, le=4096, description="Examples per squared batch "
                                                                 "gradient (the authors: 8).")
    n_calibration: int = Field(128, ge=1, le=100_000, description="Task examples for the "
                                                                  "recalibration Hessian.")
    calibration_seed: int = Field(0, ge=0, description="Seed of the example draws.")
    task: str | None = Field(None, description="Zoo task of the recalibration data (unset: the "
                                               "fine-tune's own task from its zoo.json).")
    sequential: bool = Field(True, description="True-sequential Hessians: each linear sees "
                                               "inputs through the already repaired ones.")
    safety_vector: Literal["unaligned", "alignment_delta"] = Field(
        "unaligned", description="v = aligned - unaligned (the paper); 'alignment_delta' (ours, "
                                 "a fallback): v = aligned - the aligned model's own base.")


def removal_mask(delta: torch.Tensor, safety_vector: torch.Tensor, fisher: torch.Tensor,
                 params: Params) -> torch.Tensor:
    """The entries of one block that IRR removes (see the module docstring)."""
    conflict = torch.sign(delta) != torch.sign(safety_vector)
    if params.remove_more:
        score = torch.where(conflict, fisher, -fisher)
        candidates = torch.ones_like(conflict)
    else:
        score, candidates = fisher, conflict
    values = score[candidates]
    order = torch.argsort(values, stable=True)
    chosen = torch.zeros_like(values, dtype=torch.bool)
    chosen[order[int(values.numel() * params.keep_conflicting):]] = True
    mask = torch.zeros_like(conflict)
    mask[candidates] = chosen
    return mask


def irr_matrix(delta: torch.Tensor, safety_vector: torch.Tensor, fisher: torch.Tensor,
               hessian: torch.Tensor, params: Params, *, name: str = "", path=None
               ) -> tuple[torch.Tensor, dict]:
    """``(repaired delta D' in float32, report)`` for one linear weight's delta (out x in)."""
    original = delta.to(torch.float32)
    d = original.clone()
    device = d.device
    v = safety_vector.to(device=device, dtype=torch.float32)
    f = fisher.to(device=device, dtype=torch.float32)
    cols = d.shape[1]
    damped, dead = condition(hessian.to(device), params.percdamp, name=name, path=path)
    d[:, dead] = 0.0
    upper = inverse_upper_factor(damped, name=name, path=path)
    removed = torch.zeros_like(d, dtype=torch.bool)
    width = min(params.blocksize, cols)
    for i1 in range(0, cols, width):
        i2 = min(i1 + width, cols)
        w1 = d[:, i1:i2].clone()
        u1 = upper[i1:i2, i1:i2]
        mask1 = removal_mask(w1, v[:, i1:i2], f[:, i1:i2], params)
        removed[:, i1:i2] = mask1
        q1 = torch.empty_like(w1)
        err1 = torch.empty_like(w1)
        for j in range(i2 - i1):
            col = w1[:, j]
            q = col.masked_fill(mask1[:, j], 0.0)
            q1[:, j] = q
            err = (col - q) / u1[j, j]
            if params.recalibrate:
                w1[:, j:] -= err.unsqueeze(1) * u1[j, j:].unsqueeze(0)
            err1[:, j] = err
        d[:, i1:i2] = q1
        if params.recalibrate:
            d[:, i2:] -= err1 @ upper[i1:i2, i2:]
    h = hessian.to(device)
    report = {
        "conflict_share": float((torch.sign(original) != torch.sign(v)).float().mean()),
        "removed_share": float(removed.float().mean()),
        "kept_share": 1.0 - float(removed.float().mean()),
        "dead_columns": int(dead.sum()),
        "change_norm": float((d - original).norm()),
        "delta_norm": float(original.norm()),
        "task_drift_after": output_drift(d - original, h),
        "task_drift_plain_removal": output_drift(
            -original.masked_fill(~(removed | dead.unsqueeze(0)), 0.0), h),
    }
    return d, report


def target_names(params: Params, layout) -> set[str]:
    if params.targets == "qv":
        return {n for n in layout.decoder_linears if n.endswith(("q_proj.weight", "v_proj.weight"))}
    return set(layout.decoder_linears)


def repair_tensor(inputs, params: Params):
    if not inputs.target:
        return inputs.finetuned, None
    original = inputs.finetuned - inputs.aligned
    delta, report = irr_matrix(original, inputs.safety_vector, inputs.fisher, inputs.task_hessian,
                               params, name=inputs.name, path=inputs.path)
    # an entry IRR left alone is the fine-tune's own value (W_a + (W_f - W_a) can round)
    return torch.where(delta == original, inputs.finetuned, inputs.aligned + delta), report


__all__ = ["NAME", "PAPER", "Params", "irr_matrix", "removal_mask", "repair_tensor",
           "target_names"]
