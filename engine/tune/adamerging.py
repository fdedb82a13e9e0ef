"""AdaMerging for language models: merging coefficients learned by entropy minimisation.

Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024
(arXiv:2310.02575). Merged weights theta(lambda) = theta_0 + sum_k clamp(lambda_k, 0, 1) tau_k,
tau_k = theta_k - theta_0. ``granularity="task"``: one lambda per fine-tune (the paper's
task-wise); ``"tensor"``: one per fine-tune and per tensor of the state dict, weight and bias
apart, norms included (the paper's layer-wise, as its code counts layers). The paper's
defaults: lambda initialised to 0.3, clamped to [0, 1] in every forward pass (the raw
parameter is unconstrained), Adam with lr 1e-3 and betas (0.9, 0.999), 500 steps, each step
two batches of 16 unlabeled inputs per task.

The paper minimises the Shannon entropy of image classifiers' predictions. For causal LMs
(ours, labelled as such): for each unlabeled prompt, the answer is greedy-decoded under the
current lambda (no gradient; at most the task's longest answer plus end of sequence), then
prompt + decoded answer is teacher-forced and the loss is the mean next-token entropy over
the answer positions (the end-of-sequence position included), summed over the tasks' batches.
Gradients reach only the lambdas (``torch.func.functional_call`` over the merged tensors).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from engine.errors import ParameterError

GRANULARITIES = ("task", "tensor")


@dataclass
class AdaMergingResult:
    coefficients: list[dict[str, float]] | list[float]   # per model: {tensor: lambda} or lambda
    entropy: list[float] = field(default_factory=list)   # the loss at each step (before update)
    granularity: str = "task"


def _float_names(base: Mapping[str, torch.Tensor]) -> list[str]:
    return [n for n, t in base.items() if t.is_floating_point()]


def merged_state(base: Mapping[str, torch.Tensor], vectors: Sequence[Mapping[str, torch.Tensor]],
                 lambdas: torch.Tensor, names: Sequence[str], granularity: str) -> dict:
    """theta_0 + sum_k clamp(lambda) tau_k for every float tensor (differentiable in lambda);
    other tensors as the base's. ``lambdas``: (K,) task-wise or (K, len(names)) tensor-wise."""
    lam = lambdas.clamp(0.0, 1.0)
    out = dict(base)
    for j, name in enumerate(names):
        total = base[name]
        for k, tau in enumerate(vectors):
            coef = lam[k] if granularity == "task" else lam[k, j]
            total = total + coef * tau[name]
        out[name] = total
    return out


def _entropy_loss(model, state, prompts: list[list[int]], answers: list[list[int]], pad_id: int):
    """Mean next-token entropy over the answer positions of prompt + answer (right padded)."""
    from torch.func import functional_call

    rows = [p + a for p, a in zip(prompts, answers)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    keep = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, rows)):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
        keep[i, len(p) - 1:len(r) - 1] = True  # the positions that predict the answer tokens
    device = next(iter(state.values())).device
    logits = functional_call(model, state, args=(), kwargs={
        "input_ids": ids.to(device), "attention_mask": mask.to(device), "use_cache": False},
        strict=False).logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return entropy[keep.to(device)].mean()


def adamerging(base: Mapping[str, torch.Tensor], finetunes: Sequence[Mapping[str, torch.Tensor]],
               model, tokenizer, task_prompts: Sequence[Sequence[str]], *,
               max_new_tokens: Sequence[int], granularity: str = "task", steps: int = 500,
               lr: float = 1e-3, init: float = 0.3, batch: int = 16, batches_per_task: int = 2,
               seed: int = 0) -> AdaMergingResult:
    """Learn the coefficients (see the module doc). ``task_prompts[k]``: unlabeled prompts of
    fine-tune k's task; ``max_new_tokens[k]``: its decode budget. ``model``: a model object of
    the base's architecture (its own weights are replaced by the merged ones)."""
    from engine.evaluate.decode import greedy_decode
    from engine.evaluate.scoring import _load_strict

    if granularity not in GRANULARITIES:
        raise ParameterError(f"adamerging granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if steps < 0 or lr <= 0 or batch < 1 or batches_per_task < 1:
        raise ParameterError("adamerging needs steps >= 0, lr > 0, batch >= 1, batches_per_task >= 1")
    if len(task_prompts) != len(finetunes) or any(len(p) == 0 for p in task_prompts):
        raise ParameterError("adamerging needs unlabeled prompts for every fine-tune")
    names = _float_names(base)
    vectors = [{n: ft[n] - base[n] for n in names} for ft in finetunes]
    shape = (len(finetunes),) if granularity == "task" else (len(finetunes), len(names))
    raw = torch.full(shape, float(init), dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.Adam([raw], lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    rng = random.Random(seed)
    ids = [[list(tokenizer(p, add_special_tokens=True)["input_ids"]) for p in prompts]
           for prompts in task_prompts]
    history: list[float] = []
    for _ in range(steps):
        with torch.no_grad():
            state = merged_state(base, vectors, raw.detach(), names, granularity)
            _load_strict(model, {k: v.detach() for k, v in state.items()})
        batches = []
        for k, prompts in enumerate(ids):
            for _ in range(batches_per_task):
                rows = (list(prompts) if len(prompts) <= batch  # every prompt, every step
                        else [prompts[rng.randrange(len(prompts))] for _ in range(batch)])
                answers = greedy_decode(model, rows, max_new_tokens[k] + 1,
                                        eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
                batches.append((rows, [a if a else [tokenizer.eos_token_id] for a in answers]))
        state = merged_state(base, vectors, raw, names, granularity)
        loss = sum(_entropy_loss(model, state, rows, answers, tokenizer.pad_token_id)
                   for rows, answers in batches)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
    lam = raw.detach().clamp(0.0, 1.0)
    if granularity == "task":
        coefficients: list = [float(v) for v in lam]
    else:
        coefficients = [{n: float(lam[k, j]) for j, n in enumerate(names)} for k in range(len(finetunes))]
    return AdaMergingResult(coefficients=coefficients, entropy=history, granularity=granularity)


def coefficient_recipe(recipe_data: Mapping, result: AdaMergingResult) -> dict:
    """A plain ``task_arithmetic`` recipe with the learned coefficients as per-model weights
    (tensor-wise: one filter condition per tensor, the longest names first so that a name
    that is a substring of another never catches it), ``lambda: 1``."""
    out = {k: v for k, v in dict(recipe_data).items() if k not in ("slices", "models")}
    out["merge_method"] = "task_arithmetic"
    out["parameters"] = {"lambda": 1.0}
    from engine.recipe import parse_recipe

    models = parse_recipe(dict(recipe_data)).input_models()
    rows = []
    for model, coef in zip(models, result.coefficients):
        if isinstance(coef, dict):
            weight = [{"filter": n, "value": v}
                      for n, v in sorted(coef.items(), key=lambda kv: (-len(kv[0]), kv[0]))]
        else:
            weight = coef
        rows.append({"model": model.model, "parameters": {"weight": weight}})
    out["models"] = rows
    return out


__all__ = ["AdaMergingResult", "GRANULARITIES", "adamerging", "coefficient_recipe", "merged_state"]
