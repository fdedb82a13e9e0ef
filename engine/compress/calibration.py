"""Calibration for the compressors that learn a few scalars (BitDelta scale distillation, DBMS).

Data: a handful of prompts with their answers from the zoo tasks' *training* split
(``engine.evaluate.tasks.train_stream``; the held-out examples that score the models are never
used), or, with the methods' ``calibration_data`` (``--calibration FILE`` on the command line),
from the dev split of the user's JSONL file (``engine.evaluate.calibration_data``; never its
held-out half), encoded the same way: prompt, answer, end of sequence. Objective: the
fine-tuned model is the teacher; the rebuilt model (base plus compressed delta, as a
differentiable function of the learned scalars) is trained to match the teacher's next-token
distributions (KL divergence) at the positions that produce the answer (on the zoo's tasks the
prompt positions only predict random text, which the task never asks for). This is BitDelta's
logit distillation and the "low-cost learning" of DBMS's two scalars. It needs the model in
memory (forward and backward passes), unlike compression itself, which streams.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

import torch

from engine.errors import ParameterError
from engine.evaluate.calibration_data import CalibrationData


@dataclass
class CalibrationJob:
    """Everything a compressor's ``calibrate`` hook may use."""

    config: dict
    tokenizer: object
    device: torch.device
    matrices: list[str]                         # 2-D tensor names, in section order
    base: dict[str, torch.Tensor]               # every base tensor, float32 on device
    teacher: dict[str, torch.Tensor]            # the fine-tune, float32 on device
    vectors: dict[str, torch.Tensor]            # 1-D deltas as stored (fp16-exact), float32
    section: Callable[[int], bytes]             # the current bytes of matrix i's section
    decode: Callable[[int], torch.Tensor]       # matrix i's rebuilt delta (float32, device)
    tasks: list[str]
    seed: int = 0
    data: CalibrationData | None = None         # the user's file: its dev split, not the tasks
    log: list[str] = field(default_factory=list)


def calibration_texts(tasks: list[str], n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (prompt, answer) pairs from the training split of ``tasks`` (round robin)."""
    from engine.evaluate.tasks import TASKS, train_stream

    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ParameterError(f"unknown calibration task(s) {unknown or tasks}; known: {list(TASKS)}")
    rng = random.Random(seed)
    streams = [train_stream(TASKS[t], rng) for t in tasks]
    return [next(streams[i % len(streams)]) for i in range(n)]


def calibration_batch(tokenizer, pairs: list[tuple[str, str]], device
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded token ids of prompt+answer+eos, their attention mask, and the mask of the
    positions whose next token is part of the answer (where the task is decided)."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    rows, starts = [], []
    for prompt, answer in pairs:
        ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        starts.append(len(ids))
        ids += list(tokenizer(answer, add_special_tokens=False)["input_ids"])
        rows.append(ids + ([eos] if eos is not None else []))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    target = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
        target[i, starts[i] - 1:len(row) - 1] = True  # logits at t predict token t + 1
    return ids.to(device), mask.to(device), target.to(device)


def distill(job: CalibrationJob, weights: Callable[[], dict[str, torch.Tensor]],
            trainables: list[torch.Tensor], *, n_prompts: int, steps: int, lr: float) -> dict:
    """Adam on ``trainables`` so the model built from ``weights()`` matches the teacher.

    ``weights()`` returns the full parameter dict (differentiable in ``trainables``). Returns
    {"kl_before", "kl_after", "steps"}."""
    from torch.func import functional_call

    from engine.evaluate.loading import model_from_config

    model = model_from_config(job.config).to(job.device)
    for p in model.parameters():
        p.requires_grad_(False)
    pairs = (job.data.draw(n_prompts, job.seed) if job.data is not None
             else calibration_texts(job.tasks, n_prompts, job.seed))
    ids, mask, keep = calibration_batch(job.tokenizer, pairs, job.device)

    def logits(params):
        return functional_call(model, params, (ids,), {"attention_mask": mask, "use_cache": False}).logits

    with torch.no_grad():
        teacher_logp = torch.log_softmax(logits(job.teacher).float(), dim=-1)[keep]

    def loss_fn():
        student = torch.log_softmax(logits(weights()).float(), dim=-1)[keep]
        return torch.nn.functional.kl_div(student, teacher_logp, log_target=True, reduction="batchmean")

    with torch.no_grad():
        before = float(loss_fn())
    optimizer = torch.optim.Adam(trainables, lr=lr)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = float(loss_fn())
    job.log.append(f"calibration KL {before:.4g} -> {after:.4g} in {steps} steps on {len(pairs)} prompts")
    return {"kl_before": before, "kl_after": after, "steps": steps}
