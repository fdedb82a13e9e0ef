"""Calibration for the compressors that learn a few scalars (BitDelta scale distillation, the
DBMS-style scalars). The fine-tuned model is the teacher; the rebuilt model (base plus
compressed delta, a differentiable function of the learned scalars) is the student. It needs
the model in memory (forward and backward passes), unlike compression itself, which streams.
Two recipes:

``distill_logit_mse``: BitDelta's own (the authors' ``bitdelta/train.py``): the mean squared
error between the student's and the teacher's logits at every position of generic text, a
fresh batch of ``batch_size`` rows of ``seq_len`` tokens each step (the authors: C4, 4 rows of
128 tokens, 200 steps), AdamW (torch's default weight decay 0.01, as theirs) with the learning
rate annealed from ``lr`` to 0 by a cosine over the steps (``CosineAnnealingLR(T_max=steps)``).
Generic text here (our adaptation: the workbench has no C4): the dev split of the user's
``calibration_data`` file, else the text the zoo's bases were pretrained on
(``zoo_pretraining_items``: generic lines and the upper-case-tag skill records of every task,
in the bases' own mixture, training split), never the fine-tune's own task prompts. Rows are
packed: items (text, its continuation, end of sequence) are appended until ``seq_len`` tokens,
the last one cut, so every position is text (C4 rows are documents cut at 128 tokens; the
zoo's lines are ~20 tokens, and padding would make the loss mostly padding). A user's file
too small for the rows asked is cycled, and the report says how many passes it took.

``distill`` (ours: BitDelta's ``task_kl`` option and the DBMS-style scalars): the KL divergence
to the teacher's next-token distributions at the positions that produce the answer of
``n_prompts`` (prompt, answer) pairs, one batch, Adam at a constant ``lr``. The pairs come from
the zoo tasks' *training* split (``engine.evaluate.tasks.train_stream``; the held-out examples
that score the models are never used) or from the dev split of the user's JSONL file
(``engine.evaluate.calibration_data``; never its held-out half), encoded as prompt, answer, end
of sequence.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from engine.errors import ParameterError
from engine.evaluate.calibration_data import CalibrationData


def cosine_lr(step: int, steps: int, lr: float) -> float:
    """The learning rate of update ``step`` (0-based) under ``CosineAnnealingLR(T_max=steps,
    eta_min=0)`` stepped after every update: ``lr (1 + cos(pi step / steps)) / 2``."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))


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


# ---------------------------------------------------------------- what a method learns on
def default_tasks(ft_path) -> list[str]:
    """The fine-tune's zoo task (every main task for a zoo base or a model in no zoo)."""
    from engine.evaluate.tasks import MAIN_TASKS
    from engine.merge.calibration import task_list, zoo_task_of

    task = zoo_task_of(ft_path)
    return task_list(task) if task else list(MAIN_TASKS)


def learns(spec, params) -> bool:
    """Will the method's ``calibrate`` hook run? A calibrated method declares it (``learns``:
    BitDelta unless ``distill: false``, DBMS unless its scalars are given)."""
    if not spec.calibrated:
        return False
    declared = getattr(spec.module, "learns", None)
    return True if declared is None else bool(declared(params))


def calibration_plan(spec, params, ft_path, data) -> dict:
    """What a calibrated method learns on: ``{"data"}``, ``{"text"}`` (generic text) or
    ``{"tasks"}``, with a one-line ``warning`` when a fine-tune in no zoo, given no file, falls
    back to the zoo's text or tasks (recorded in the manifest and the result's warnings)."""
    if not learns(spec, params):
        return {}
    if data is not None:
        return {"data": str(data.path)}
    from engine.merge.calibration import zoo_task_of

    in_zoo = zoo_task_of(ft_path) is not None
    kind = params.calibration_text() if hasattr(params, "calibration_text") else "tasks"
    if kind == "generic":
        plan = {"text": "zoo pretraining text"}
        if not in_zoo:
            plan["warning"] = (f"{spec.name}: the fine-tune is in no zoo and no calibration data was "
                               "given: distilled on the zoo's synthetic pretraining text (give "
                               "--calibration FILE.jsonl for text of its own domain)")
        return plan
    if getattr(params, "tasks", None):
        return {"tasks": list(params.tasks)}
    plan = {"tasks": default_tasks(ft_path)}
    if not in_zoo:
        plan["warning"] = (f"{spec.name}: the fine-tune is in no zoo and no calibration data was "
                           f"given: calibrated on the training prompts of every zoo task "
                           f"({', '.join(plan['tasks'])}) (give --calibration FILE.jsonl or tasks)")
    return plan


# ---------------------------------------------------------------- generic text (logit MSE)
def zoo_pretraining_items(seed: int) -> Iterator[tuple[str, str]]:
    """Endless (text, continuation) items of the zoo bases' pretraining corpus, training split:
    generic lines (no continuation) and skill records (upper-case-tag prompt, answer), drawn
    with the bases' own mixture weights (``engine.zoo.plan.PRETRAIN_MIXTURE``)."""
    from engine.evaluate.tasks import SKILL_TASKS, generic_train_stream, train_stream
    from engine.zoo.plan import PRETRAIN_MIXTURE

    rng = random.Random(f"generic-calibration:{seed}")  # str seeds are stable across runs
    generic = generic_train_stream(rng)
    skills = [train_stream(task, rng) for task in SKILL_TASKS.values()]
    names = list(PRETRAIN_MIXTURE)
    weights = [PRETRAIN_MIXTURE[n] for n in names]
    while True:
        if rng.choices(names, weights)[0] == "generic":
            yield next(generic), ""
        else:
            yield next(rng.choice(skills))


def data_items(data: CalibrationData, seed: int) -> Iterator[tuple[str, str]]:
    """The file's dev examples, shuffled once, cycled (for a file smaller than the rows)."""
    examples = data.draw(len(data), seed)
    while True:
        yield from examples


def packed_rows(tokenizer, items: Iterator[tuple[str, str]], n_rows: int, seq_len: int
                ) -> tuple[torch.Tensor, int]:
    """``n_rows`` rows of ``seq_len`` token ids, each filled with whole items (text ids with the
    tokenizer's special tokens, continuation ids, eos), the last item cut at the row's end;
    and how many items were used."""
    eos = tokenizer.eos_token_id
    rows, used = [], 0
    for _ in range(n_rows):
        row: list[int] = []
        while len(row) < seq_len:
            text, continuation = next(items)
            used += 1
            ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
            if continuation:
                ids += list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
            row += ids + ([eos] if eos is not None else [])
        rows.append(row[:seq_len])
    return torch.tensor(rows, dtype=torch.long), used


def text_rows(job: CalibrationJob, n_rows: int, seq_len: int) -> tuple[torch.Tensor, dict]:
    """The generic-text rows of ``distill_logit_mse`` and what they were made of."""
    if job.data is not None:
        rows, used = packed_rows(job.tokenizer, data_items(job.data, job.seed), n_rows, seq_len)
        source = {"text": f"calibration_data (dev split, {len(job.data)} examples)",
                  "passes": round(used / len(job.data), 2)}
        if used > len(job.data):
            source["warnings"] = [f"{job.data.path}: {job.data.named_by}: its dev split "
                                  f"({len(job.data)} examples) filled the {n_rows} rows of "
                                  f"{seq_len} tokens in {source['passes']} passes (examples reused)"]
        return rows, source
    rows, _ = packed_rows(job.tokenizer, zoo_pretraining_items(job.seed), n_rows, seq_len)
    return rows, {"text": "zoo pretraining text (generic lines and skills, training split)"}


PROBE_ROWS = 16  # rows of the same text held aside to measure the MSE before and after


def distill_logit_mse(job: CalibrationJob, weights: Callable[[], dict[str, torch.Tensor]],
                      trainables: list[torch.Tensor], *, steps: int, lr: float, batch_size: int,
                      seq_len: int) -> dict:
    """BitDelta's scale distillation as its authors run it (module docstring). Returns
    ``{"mse_before", "mse_after"}`` (on ``PROBE_ROWS`` held-aside rows of the same text, drawn
    first, so the same for any number of steps), the rows' source, and ``lrs``, the learning
    rate of every update."""
    from torch.func import functional_call

    from engine.evaluate.loading import model_from_config

    model = model_from_config(job.config).to(job.device)
    for p in model.parameters():
        p.requires_grad_(False)
    probe_rows = max(PROBE_ROWS, batch_size)
    rows, source = text_rows(job, probe_rows + steps * batch_size, seq_len)
    rows = rows.to(job.device)
    probe, rows = rows[:probe_rows], rows[probe_rows:]  # held aside: the before/after measure

    def logits(params, ids):
        return functional_call(model, params, (ids,), {"use_cache": False}).logits.float()

    def mse(ids) -> torch.Tensor:
        with torch.no_grad():
            target = logits(job.teacher, ids)
        return torch.nn.functional.mse_loss(logits(weights(), ids), target)

    with torch.no_grad():
        before = float(mse(probe))
    optimizer = torch.optim.AdamW(trainables, lr=lr)  # weight_decay 0.01: torch's, the authors'
    lrs = []
    for step in range(steps):
        lrs.append(cosine_lr(step, steps, lr))
        for group in optimizer.param_groups:
            group["lr"] = lrs[-1]
        optimizer.zero_grad(set_to_none=True)
        loss = mse(rows[step * batch_size:(step + 1) * batch_size])
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = float(mse(probe))
    job.log.append(f"logit MSE {before:.4g} -> {after:.4g} in {steps} steps of {batch_size} x {seq_len}")
    return {"objective": "logit_mse", "mse_before": before, "mse_after": after, "steps": steps,
            "batch_size": batch_size, "seq_len": seq_len, "lr": lr, "schedule": "cosine",
            **source, "lrs": lrs}
