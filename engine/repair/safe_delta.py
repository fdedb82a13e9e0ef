"""Safe Delta (Lu et al., ICML 2025, arXiv:2505.12038; the authors' code, adapted from SparseGPT).

Per linear weight ``W`` (out x in) of the decoder layers, from the aligned weight ``W_a``, the
fine-tuned ``W_f`` and the safety Hessian ``H`` (the aligned model's inputs to this layer on
harmful prompts with the aligned model's refusals, ``engine.repair.obs``):

1. ``U`` = upper Cholesky factor of the damped ``H^-1``; ``d_j = U_jj``.
2. Blocks of ``blocksize`` columns. In a block, keeping entry (i, j) of the delta costs
   ``c_ij = (W_f - W_cur)_ij^2 / d_j^2`` of safety (the OBS increase of the output drift on
   safety data; ``W_cur`` carries the compensation of earlier blocks). Every entry of column j
   has the key ``1 / d_j^2``: with utility modelled as ``delta^2``, ascending key is best
   utility per safety cost first.
3. The ``exclude_top`` share (0.15) of the block's entries with the largest key is never kept
   (ties in stable index order; the authors' unstable sort and slice ``[0:-k]`` keep nothing
   when k rounds to 0, ours then excludes nothing);
   the rest, in ascending key order, are kept while the running sum of their costs stays within
   the block's budget:
   - ``budget: paper``: ``eps = mean(1/d^2) * (s / 2) * (rows / 4096)`` (the code's rule,
     normalised to Llama-7B's 4096 rows; the ``/2`` is fixed). The budget is not scale-free:
     the costs carry ``delta^2``, so on large deltas (the zoo's) it admits almost nothing;
   - ``budget: fraction`` (ours, for large deltas): ``eps = s * (the cost of every candidate
     entry)``, i.e. at most a share ``s`` of the full delta's safety cost.
4. Sub-block by sub-block of ``sub_block`` (4) columns: kept entries take ``W_f``'s value;
   their error ``(w - q) / d`` is pushed into the columns after the sub-block (inside the block,
   then into later blocks at block end), the OBS update that moves the layer's outputs on safety
   data back towards the aligned model's: the *safety compensation vector*. As in the authors'
   code, columns inside one sub-block do not compensate each other.

Kept entries equal ``W_f`` bit for bit; every other entry is ``W_a`` plus compensation.
``compensate: false`` is the ablation (the mask alone). Embeddings, head and norms come from the
aligned model, as the paper's code edits the aligned model in place (``non_linear_policy``).
Dead columns (``H_jj = 0``) get ``H_jj = 1`` and keep their weights, as the authors do.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from engine.repair.obs import condition, inverse_upper_factor, output_drift

NAME = "safe_delta"
PAPER = ("Lu et al., Safe Delta: Consistently Preserving Safety when Fine-Tuning LLMs on "
         "Diverse Datasets, ICML 2025 (arXiv:2505.12038)")
STATS = ("safety_hessian",)


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    s: float = Field(0.1, ge=0.0, description="Safety/utility knob: the budget's scale "
                                              "(paper scripts: 0.1-0.11). Larger keeps more delta.")
    budget: Literal["paper", "fraction"] = Field(
        "paper", description="'paper' = the authors' rule, mean(1/d^2) * s/2 * rows/4096; "
                             "'fraction' (ours, for large deltas) = a share s of the full "
                             "delta's safety cost per block.")
    exclude_top: float = Field(0.15, ge=0.0, lt=1.0, description="Share of each block's entries "
                               "(the most safety-sensitive columns) that is never kept.")
    compensate: bool = Field(True, description="Add the safety compensation vector (off: the "
                                               "ablation, the mask alone).")
    blocksize: int = Field(2048, ge=1, le=1 << 20, description="Columns per block (the authors' "
                                                               "runner: 2048).")
    sub_block: int = Field(4, ge=1, le=1 << 16, description="Columns per compensation step.")
    percdamp: float = Field(0.01, gt=0.0, le=10.0, description="Damping: this share of the "
                                                               "Hessian's mean diagonal.")
    n_calibration: int = Field(128, ge=1, le=100_000, description="Safety calibration examples.")
    calibration_seed: int = Field(0, ge=0, description="Seed of the calibration draw.")
    tensors: Literal["decoder_linears", "all_linears"] = Field(
        "decoder_linears", description="Which linears are repaired: those of the decoder layers "
                                       "(the paper) or every linear the model has.")
    non_linear_policy: Literal["aligned", "finetuned"] = Field(
        "aligned", description="Tensors not repaired (embeddings, head, norms): from the aligned "
                               "model (the paper's code) or the fine-tune (ours).")


def safe_delta_matrix(w_aligned: torch.Tensor, w_finetuned: torch.Tensor, hessian: torch.Tensor,
                      params: Params, *, name: str = "", path=None) -> tuple[torch.Tensor, dict]:
    """``(repaired W in float32, report)`` for one linear weight (out x in)."""
    w = w_aligned.to(torch.float32).clone()
    target = w_finetuned.to(device=w.device, dtype=torch.float32)
    rows, cols = w.shape
    damped, dead = condition(hessian.to(w.device), params.percdamp, name=name, path=path)
    upper = inverse_upper_factor(damped, name=name, path=path)
    kept = torch.zeros_like(w, dtype=torch.bool)
    excluded = 0
    width = min(params.blocksize, cols)
    for i1 in range(0, cols, width):
        i2 = min(i1 + width, cols)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()
        f1 = target[:, i1:i2]
        u1 = upper[i1:i2, i1:i2]
        d = torch.diagonal(u1)
        key = (1.0 / d.square()).expand(rows, count)
        cost = (f1 - w1).square() / d.square()
        order = torch.argsort(key.reshape(-1), stable=True)
        n_excluded = int(params.exclude_top * key.numel())
        candidates = order[:key.numel() - n_excluded]
        excluded += n_excluded
        running = torch.cumsum(cost.reshape(-1)[candidates].double(), 0)
        if params.budget == "paper":
            eps = float(key.mean()) * (params.s / 2.0) * (rows / 4096.0)
        else:
            eps = params.s * float(running[-1]) if running.numel() else 0.0
        flat = torch.zeros(key.numel(), dtype=torch.bool, device=w.device)
        flat[candidates[running <= eps]] = True
        mask1 = flat.reshape(rows, count)
        kept[:, i1:i2] = mask1
        if not params.compensate:
            w[:, i1:i2] = torch.where(mask1, f1, w1)
            continue
        q1 = torch.empty_like(w1)
        err1 = torch.empty_like(w1)
        for j1 in range(0, count, params.sub_block):
            j2 = min(j1 + params.sub_block, count)
            cur = w1[:, j1:j2]
            q = torch.where(mask1[:, j1:j2], f1[:, j1:j2], cur)
            q1[:, j1:j2] = q
            err = (cur - q) / d[j1:j2].unsqueeze(0)
            w1[:, j2:] -= err @ u1[j1:j2, j2:]
            err1[:, j1:j2] = err
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ upper[i1:i2, i2:]
    aligned32 = w_aligned.to(device=w.device, dtype=torch.float32)
    change = w - aligned32
    report = {
        "kept_share": float(kept.float().mean()),
        "excluded_share": excluded / kept.numel(),
        "dead_columns": int(dead.sum()),
        "safety_cost_full_delta": output_drift(target - aligned32, hessian.to(w.device)),
        "safety_cost_after": output_drift(change, hessian.to(w.device)),
        "compensation_norm": float(change.masked_fill(kept, 0.0).norm()),
        "delta_norm": float((target - aligned32).norm()),
    }
    return w, report


def target_names(params: Params, layout) -> set[str]:
    names = set(layout.decoder_linears)
    if params.tensors == "all_linears":
        names |= set(layout.other_linears)
    return names


def repair_tensor(inputs, params: Params):
    if not inputs.target:
        return (inputs.aligned if params.non_linear_policy == "aligned" else inputs.finetuned), None
    return safe_delta_matrix(inputs.aligned, inputs.finetuned, inputs.safety_hessian, params,
                             name=inputs.name, path=inputs.path)


__all__ = ["NAME", "PAPER", "Params", "repair_tensor", "safe_delta_matrix", "target_names"]
