"""What the repair methods learn from data: which examples, and the batch Fisher of IRR.

- **Safety data** (Safe Delta's Hessian, IRR's Fisher): harmful prompts paired with the
  aligned model's own refusals. By default ``n`` training-split examples of the zoo's
  ``refuse`` task (harmful-marked requests answered with the refusal the aligned model was
  taught). Given a JSONL file (``--calibration``), its dev split is read by the project's
  calibration reader, and only the lines the aligned model itself answers with the line's
  answer are used (greedy decoding, the own-data scorer's rules): those are its refusals. A
  file with none is refused naming the file.
- **Task data** (IRR's recalibration Hessian): ``n`` training-split examples of the
  fine-tune's zoo task (or a named one), or the dev split of the user's task file.
- **Batch Fisher** (IRR, the authors' ``compute_fisher_information_matrix``): the mean over
  batches of ``batch_size`` examples of the squared gradient of the batch's token-mean
  cross-entropy on the answer tokens (prompt masked), for the target weights only. This is not
  ``engine.merge.fisher_gram.fisher_diagonal``, which squares per-example gradients of the
  summed log-likelihood (Matena & Raffel's Fisher merging).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from engine.errors import ConfigError, ParameterError
from engine.evaluate.calibration_data import CalibrationData
from engine.evaluate.decode import greedy_decode
from engine.evaluate.own_data import continuation_text
from engine.merge.calibration import calibration_examples, encode

Example = tuple[str, str]
SAFETY_TASK = "refuse"
EXTRA_NEW_TOKENS = 4  # as the own-data scorer: the answer's tokens + 4


def answered_as_given(model, tokenizer, examples: Sequence[Example], batch_size: int = 64) -> list[bool]:
    """Per example: does the model's greedy continuation of the prompt equal the answer?"""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    out = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        prompts = [list(tokenizer(p)["input_ids"]) for p, _ in chunk]
        budgets = [len(tokenizer(a, add_special_tokens=False)["input_ids"]) + EXTRA_NEW_TOKENS
                   for _, a in chunk]
        decoded = greedy_decode(model, prompts, max(budgets), eos_id=eos if eos is not None else -1,
                                pad_id=pad, batch_size=len(chunk))
        out.extend(continuation_text(tokenizer, tokens[:budget]) == answer.strip()
                   for tokens, budget, (_, answer) in zip(decoded, budgets, chunk))
    return out


def safety_examples(n: int, seed: int, *, data: CalibrationData | None = None,
                    aligned_model=None, tokenizer=None) -> tuple[list[Example], list[str]]:
    """``(examples, notes)``: the safety calibration set (see the module docstring)."""
    if data is None:
        return calibration_examples(SAFETY_TASK, n, seed), []
    drawn = data.draw(n, seed)
    matches = answered_as_given(aligned_model, tokenizer, drawn)
    kept = [ex for ex, ok in zip(drawn, matches) if ok]
    if not kept:
        raise ConfigError(f"{data.named_by}: no refusal examples: the aligned model answers none of "
                          f"its {len(drawn)} dev line(s) with the line's answer (safety calibration "
                          "needs harmful prompts paired with the aligned model's own refusals)",
                          path=data.path)
    notes = []
    if len(kept) < len(drawn):
        notes.append(f"{data.path}: {data.named_by}: {len(drawn) - len(kept)} of {len(drawn)} dev "
                     "line(s) left out: the aligned model does not answer them as the file says")
    shortfall = data.shortfall(n)
    if shortfall:
        notes.append(shortfall)
    return kept, notes


def task_examples(n: int, seed: int, *, task: str | None = None,
                  data: CalibrationData | None = None, finetuned: str | Path | None = None
                  ) -> tuple[list[Example], list[str]]:
    """``(examples, notes)``: IRR's task calibration set."""
    if data is not None:
        note = data.shortfall(n)
        return data.draw(n, seed), [note] if note else []
    if task is None and finetuned is not None:
        from engine.merge.calibration import ALL_TASKS, zoo_task_of

        task = zoo_task_of(finetuned)
        task = None if task == ALL_TASKS else task
    if task is None:
        raise ParameterError(f"no task data for the recalibration of {finetuned}: it is in no zoo "
                             "(zoo.json); give --task-data FILE.jsonl or --param task=NAME")
    return calibration_examples(task, n, seed), []


def batch_fisher(model, tokenizer, examples: Sequence[Example], names: Sequence[str],
                 batch_size: int = 8) -> dict[str, torch.Tensor]:
    """``{weight name: mean over batches of (grad of the batch's mean answer-token CE)^2}``."""
    if not examples:
        raise ParameterError("the Fisher needs at least one safety example")
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ConfigError(f"the model has no parameter {missing[0]!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    tensors = [params[n] for n in names]
    for p in tensors:
        p.requires_grad_(True)
    sums = [torch.zeros_like(p, dtype=torch.float32) for p in tensors]
    encoded = encode(tokenizer, examples)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = tensors[0].device
    batches = 0
    model.eval()
    try:
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            x = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(x)
            labels = torch.full_like(x, -100)
            for row, (ids, prompt_len) in enumerate(chunk):  # right padding, prompt masked
                x[row, :len(ids)] = torch.tensor(ids)
                mask[row, :len(ids)] = 1
                labels[row, prompt_len:len(ids)] = torch.tensor(ids[prompt_len:])
            logits = model(input_ids=x.to(device), attention_mask=mask.to(device),
                           use_cache=False).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(device),
                ignore_index=-100)
            grads = torch.autograd.grad(loss, tensors)
            for acc, g in zip(sums, grads):
                acc.add_(g.float().square())
            batches += 1
    finally:
        for p in tensors:
            p.requires_grad_(False)
    return {n: (s / batches).cpu() for n, s in zip(names, sums)}


__all__ = ["answered_as_given", "batch_fisher", "safety_examples", "task_examples"]
