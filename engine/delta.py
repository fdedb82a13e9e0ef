"""Streaming task vectors: ``finetune - base``, one tensor at a time, in float32.

The per-tensor rules (tied head, float32, LoRA adapters) are ``engine.task_vectors``'; this
file plans which tensors a set of fine-tunes has and streams them.

A task vector is computed per tensor from a base ``ModelFolder`` and one or more fine-tuned
``ModelFolder`` s; only one tensor of each model is in memory at a time. The subtraction is done
in float32 (bf16 - bf16 in bf16 cancels most of a small fine-tuning update).

Layouts are checked before any tensor is read (headers only): every floating-point base tensor
must exist in every fine-tune with the same shape. A fine-tune with tied embeddings and no
output head uses its embedding matrix as the head. Every mismatch is collected and reported at
once in an ``IncompatibleModelsError`` whose ``tensor`` is the first bad tensor; tensors that a
fine-tune has and the base lacks are ignored (listed in ``DeltaPlan.warnings``).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from engine.compat import embed_head_names
from engine.errors import IncompatibleModelsError, NonFiniteError
from engine.io import ModelFolder
from engine.task_vectors import WORK_DTYPE, read_stored, stored_name, task_vector32
MAX_REASONS_SHOWN = 6


@dataclass
class DeltaPlan:
    """Which tensors have task vectors, and where each model's copy of a tensor is read from."""

    base: ModelFolder
    finetuned: list[ModelFolder]
    names: list[str]
    # per fine-tune: output tensor name -> the name read from that fine-tune (tied heads differ)
    sources: list[dict[str, str]]
    warnings: list[str] = field(default_factory=list)

    def source_name(self, model_index: int, name: str) -> str:
        return self.sources[model_index][name]


def plan_deltas(base: ModelFolder, finetuned: Sequence[ModelFolder],
                names: Sequence[str] | None = None) -> DeltaPlan:
    """Check layouts (headers only) and decide what to read; raise on any mismatch."""
    if not finetuned:
        raise IncompatibleModelsError("at least one fine-tuned model is needed", path=base.path)
    wanted = list(base.tensor_names if names is None else names)
    for name in wanted:
        if name not in base:
            raise IncompatibleModelsError("tensor not in the base model", path=base.path, tensor=name)
    wanted = [n for n in wanted if base.info(n).dtype.is_floating_point]

    reasons: list[str] = []
    first: tuple[str, str] | None = None  # (path, tensor) of the first problem
    sources: list[dict[str, str]] = []
    warnings: list[str] = []
    for ft in finetuned:
        ft_embed, _ = embed_head_names(ft)
        mapping: dict[str, str] = {}
        for name in wanted:
            source = stored_name(ft, name)  # a tied head is read from the embedding
            if source is None:
                reasons.append(f"{ft.path}: tensor {name!r} missing")
                first = first or (str(ft.path), name)
                continue
            b_shape, f_shape = base.info(name).shape, ft.info(source).shape
            if b_shape != f_shape:
                reasons.append(f"{ft.path}: tensor {name!r} shape {tuple(f_shape)} != base {tuple(b_shape)}")
                first = first or (str(ft.path), name)
                continue
            if not ft.info(source).dtype.is_floating_point:
                reasons.append(f"{ft.path}: tensor {name!r} is not floating point")
                first = first or (str(ft.path), name)
                continue
            mapping[name] = source
        extra = [n for n in ft.tensor_names if n not in base and n != ft_embed]
        if extra:
            warnings.append(f"{ft.path}: {len(extra)} tensor(s) not in the base are ignored")
        sources.append(mapping)
    if reasons:
        more = f" (+{len(reasons) - MAX_REASONS_SHOWN} more)" if len(reasons) > MAX_REASONS_SHOWN else ""
        summary = "; ".join(r.split(": ", 1)[1] for r in reasons[:MAX_REASONS_SHOWN])
        raise IncompatibleModelsError(f"models do not match the base: {summary}{more}",
                                      reasons=reasons, path=first[0], tensor=first[1])
    return DeltaPlan(base=base, finetuned=list(finetuned), names=wanted, sources=sources,
                     warnings=warnings)


def read_tensors(plan: DeltaPlan, name: str, device: torch.device | str | None = None,
                 ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(base, [delta_i])`` of one tensor, float32, on ``device`` (CPU by default). The base
    tensor may share storage with the reader's: never modify it in place.

    A NaN/Inf in a fine-tune is its delta's (counted by the metrics); one in the base would
    show in every fine-tune's delta, blaming them, so it is refused naming the base."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    base = read_stored(plan.base, name).to(device=device, dtype=WORK_DTYPE)
    if not bool(torch.isfinite(base).all()):
        raise NonFiniteError(f"{int((~torch.isfinite(base)).sum())} NaN/Inf value(s) in the base "
                             "(or beyond float32's range); refused", path=plan.base.path, tensor=name)
    deltas = [task_vector32(base, ft, name, source=plan.source_name(i, name))
              for i, ft in enumerate(plan.finetuned)]
    return base, deltas


def task_vector(base: ModelFolder, finetuned: ModelFolder, name: str) -> torch.Tensor:
    """One tensor's task vector (float32, CPU), checked like a whole plan."""
    plan = plan_deltas(base, [finetuned], [name])
    if not plan.names:
        raise IncompatibleModelsError("tensor is not floating point", path=base.path, tensor=name)
    return read_tensors(plan, name)[1][0]


def iter_task_vectors(plan: DeltaPlan, names: Sequence[str] | None = None, *,
                      device: torch.device | str | None = None, prefetch: bool = True,
                      ) -> Iterator[tuple[str, torch.Tensor, list[torch.Tensor]]]:
    """Yield ``(name, base32, [delta32 per fine-tune])``; the next tensor is read on a thread
    while the caller works on the current one (``prefetch``)."""
    order = list(plan.names if names is None else names)
    if not order:
        return
    if not prefetch:
        for name in order:
            base, deltas = read_tensors(plan, name, device)
            yield name, base, deltas
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="delta-read") as reader:
        pending = reader.submit(read_tensors, plan, order[0], device)
        for i, name in enumerate(order):
            base, deltas = pending.result()
            if i + 1 < len(order):
                pending = reader.submit(read_tensors, plan, order[i + 1], device)
            yield name, base, deltas
            del base, deltas
