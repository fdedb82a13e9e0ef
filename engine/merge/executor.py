"""Run a merge recipe tensor by tensor: read, merge in fp32 (fp64 for fp64 tensors; on CUDA
when present), cast, check the cast values, write. Integer and bool tensors are copied.

Memory stays at a few tensors per input model: inputs are opened lazily (``ModelFolder``) and
only the tensor being merged, the few read ahead by a prefetch thread (at most ``READ_AHEAD``,
``READ_AHEAD_BYTES``) and the few merged ones waiting to be written and checked are in RAM.

The plan (``engine.merge.plan``) checks everything that can be checked before work starts:
the recipe, every model folder, the compatibility report (all mismatches at once), and the
parameters resolved for every tensor, so a bad value fails in a second, not after an hour.

A method with a model-wide statistic (EMR's rescalers) gets it from a first pass that reads
every tensor once and keeps only the summed statistic (``MergeSpec.first_pass``).

A CUDA out-of-memory on one tensor is retried on the CPU; the merge finishes, says so in its
warnings and lists those tensors in the manifest (``cpu_fallback``).
"""

from __future__ import annotations

import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from engine.device import resolve_device
from engine.errors import DeltaWorkbenchError, ParameterError
from engine.export_card import CARD_NAME, merge_card
from engine.io import ModelFolder, ModelWriter
from engine.io.buffers import BufferPool
from engine.io.stages import StageTimes
from engine.merge.plan import (MergePlan, output_config, output_layout, plan_merge,
                               read_inputs, tokenizer_files)
from engine.merge.spec import MergeSpec
from engine.merge.vocab import retemplated_files
from engine.recipe import DTYPES, MergeRecipe

RECIPE_FILE = "merge_recipe.yml"
# Reads queued ahead of the merge: up to this many tensors, and while the inputs queued stay
# under this many bytes (at least one tensor is always read ahead).
READ_AHEAD = 4
READ_AHEAD_BYTES = 256 * 2**20
WRITE_BEHIND = 2  # merged tensors waiting for the writer thread

Progress = Callable[[float, str], None]


@dataclass
class MergeResult:
    out: Path
    tensors: int
    seconds: float
    device: str
    warnings: list[str]
    evaluation: dict | None = None    # the merged model's zoo-task scores (``evaluate=True``)
    timings: dict | None = None       # seconds per stage (engine.io.stages), "wall" included


def _merge_into(spec: MergeSpec, name: str, base_t, model_ts, out: torch.Tensor, *,
                device: torch.device, stats=None, labels=None, cpu_fallback: list[str],
                overflow: str = "refuse", times: StageTimes | None = None) -> torch.Tensor:
    """``spec.merge_into`` for one tensor; a CUDA out-of-memory on it is retried on the CPU
    (the same arithmetic, ``out`` rewritten whole) and the tensor's name is appended to
    ``cpu_fallback``, so one oversized tensor does not fail a merge of thousands."""
    try:
        return spec.merge_into(name, base_t, model_ts, out, device=device, stats=stats, labels=labels,
                               overflow=overflow, times=times)
    except torch.OutOfMemoryError:
        if device.type != "cuda":
            raise
    # Retried outside the handler: the failed attempt's GPU tensors (held by the traceback)
    # are released before the cache is emptied.
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    cpu_fallback.append(name)
    return spec.merge_into(name, base_t, model_ts, out, device=torch.device("cpu"), stats=stats,
                           labels=labels, overflow=overflow, times=times)


def run_merge(
    recipe: MergeRecipe,
    out: str | Path,
    *,
    recipe_dir: str | Path | None = None,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
    max_shard_bytes: int = 2**30,
    stats_provider: Callable[[str], list[torch.Tensor]] | None = None,
    allowed_roots: Iterable[str | Path] | None = None,
    evaluate: bool = False,
    times: StageTimes | None = None,
) -> MergeResult:
    """Merge per ``recipe`` into a new model folder ``out`` (atomic: all or nothing), with
    its model card (README.md). ``evaluate``: score the merged model on the zoo tasks before
    it is published; the table goes into the card and the manifest (``evaluation``).

    ``stats_provider(name)`` gives fisher/regmean their per-tensor statistics; without one
    they are calibrated here (``engine.merge.calibration``, settings from the recipe's
    ``calibration`` parameter, on its ``data`` file, a ``calibration_task`` or the zoo
    manifest's task).

    ``times`` collects seconds per stage (plan, read, convert, merge, check, write, verify,
    hash, fsync, finalize, and the merge thread's waits for the reader and the writer); they go into
    the manifest (``timings``) and ``MergeResult.timings``."""
    started = time.perf_counter()
    times = times if times is not None else StageTimes()
    device = resolve_device(device)
    with times.stage("plan"):  # open and check every input, resolve every tensor's parameters
        plan = plan_merge(recipe, recipe_dir=recipe_dir, allowed_roots=allowed_roots)
    own_stats = None  # statistics calibrated here are closed (their spill folder removed) here
    if plan.method.stats is not None and stats_provider is None:
        # fisher / regmean: calibrate every input model on its task's prompts (before any
        # output exists, so a calibration error leaves nothing behind)
        from engine.merge.calibration import stats_provider_for_plan

        try:
            stats_provider = own_stats = stats_provider_for_plan(
                plan, recipe_dir=recipe_dir, allowed_roots=allowed_roots)
        except BaseException:
            plan.close()
            raise
    layout = output_layout(plan)
    inputs_folders = plan.input_paths()
    labels = (str(plan.base.path) if plan.base is not None else None, [str(m.path) for m in plan.models])
    first = plan.spec.first_pass_names([name for name, _, _ in layout])
    if first:  # a model-wide statistic (EMR's rescalers): one streaming read before any output
        if progress is not None:
            progress(0.0, f"{plan.method.name}: first pass over {len(first)} tensors")
        try:
            plan.spec.first_pass(first, lambda name: read_inputs(plan, name), device=device,
                                 labels=labels)
        except BaseException:
            plan.close()
            if own_stats is not None:
                own_stats.close()
            raise
    extra: dict = dict(tokenizer_files(plan.tokenizer_folder))
    if plan.vocab is not None:  # the merged tokenizer's files replace the source's
        extra = {k: v for k, v in extra.items() if k == "generation_config.json"}
        extra.update(plan.vocab.files)
    elif recipe.chat_template:
        extra.update(retemplated_files(plan.tokenizer_folder, recipe, [plan.layout, *plan.models]))
    extra[RECIPE_FILE] = recipe.to_yaml().encode()
    evaluation: dict = {}

    def card_files(staging: Path) -> dict[str, bytes]:
        """The card, made once the weights are in the staging folder (the evaluation, when
        asked for, scores exactly the files that are then published)."""
        if evaluate:
            from engine.evaluate import evaluate_folder

            if progress is not None:
                progress(1.0, "evaluating the merged model")
            try:
                evaluation.update(evaluate_folder(staging))
            except DeltaWorkbenchError as err:  # named as the output, not its staging folder
                raise type(err)(f"cannot evaluate the merged model: {err.reason}", path=out,
                                tensor=err.tensor) from None
            writer.manifest_extra["evaluation"] = evaluation
        card = merge_card(recipe, base=plan.base.path if plan.base is not None else None,
                          inputs=[m.path for m in plan.models], evaluation=evaluation or None)
        return {CARD_NAME: card.encode()}

    manifest = {"kind": "merge", "recipe": recipe.model_dump(mode="json", exclude_none=True),
                "inputs": [str(f) for f in inputs_folders], "warnings": plan.warnings}
    # Four stages overlap: a thread reads the next tensors (pread, no memory map, into
    # reused buffers), the caller's thread merges one (the heavy kernels' large tensors on two
    # threads, see engine.merge.chunked), a thread writes the ones merged before in place in
    # their shard (the writer knows the whole layout up front, so nothing is buffered), and the
    # writer's checker thread reads each back, compares it and hashes it. Queues are short
    # (READ_AHEAD, WRITE_BEHIND, the checker's), so memory stays at a few tensors.
    folders = [f for f in {id(f): f for f in [*plan.opened, plan.layout, *plan.models,
                                              *([plan.base] if plan.base else [])]}.values()
               if isinstance(f, ModelFolder)]
    if plan.stack is not None:
        input_bytes = [sum(f.info(src).nbytes for f, src in [*([r.base] if r.base else []), *r.models]
                           if src in f) for r in (plan.stack.routes[name] for name, _, _ in layout)]
    else:
        input_bytes = [sum(m.info(name).nbytes for m in folders if name in m) for name, _, _ in layout]
    pool = BufferPool(max_idle_bytes=2 * (len(plan.models) + 2) * max(
        [math.prod(shape) * torch.empty((), dtype=d).element_size() for _, d, shape in layout] or [0]))
    for folder in folders:
        folder.buffers = pool
    cpu_fallback: list[str] = []  # tensors merged on the CPU after a CUDA out-of-memory
    reads: deque = deque()
    writes: deque = deque()

    def read(name: str):
        with times.stage("read"):
            return read_inputs(plan, name)

    try:
        with ModelWriter(out, config=output_config(plan), extra_files=extra,
                         max_shard_bytes=max_shard_bytes, manifest_extra=manifest,
                         input_folders=inputs_folders, plan=layout,
                         late_files=card_files, times=times) as writer, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-read") as reader, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-write") as writing:
            queued = [0, 0]  # next tensor to read, input bytes queued

            def read_ahead() -> None:
                while queued[0] < len(layout) and len(reads) < READ_AHEAD and (
                        not reads or queued[1] + input_bytes[queued[0]] <= READ_AHEAD_BYTES):
                    reads.append((input_bytes[queued[0]], reader.submit(read, layout[queued[0]][0])))
                    queued[1] += input_bytes[queued[0]]
                    queued[0] += 1

            try:
                read_ahead()
                for i, (name, out_dtype, shape) in enumerate(layout):
                    nbytes, pending = reads.popleft()
                    with times.stage("wait_read"):
                        inputs = pending.result()
                    queued[1] -= nbytes
                    read_ahead()
                    stats = stats_provider(name) if stats_provider is not None else None
                    merged = pool.empty(shape, out_dtype)
                    before = len(cpu_fallback)
                    route = plan.stack.routes[name] if plan.stack is not None else None
                    _merge_into(route.spec if route else plan.spec, name, inputs[0], inputs[1], merged,
                                device=device, stats=stats,
                                labels=route.labels() if route else labels, cpu_fallback=cpu_fallback,
                                overflow=plan.recipe.overflow, times=times)
                    on_cpu = len(cpu_fallback) > before
                    if on_cpu:
                        plan.warnings.append(f"tensor {name!r}: CUDA out of memory; merged on the "
                                             "CPU instead")
                    del inputs, stats
                    while writes and (len(writes) >= WRITE_BEHIND or writes[0].done()):
                        with times.stage("wait_write"):
                            writes.popleft().result()  # a write error stops the merge here
                    writes.append(writing.submit(writer.add_tensor, name, merged))
                    del merged
                    if progress is not None:
                        progress((i + 1) / len(layout),
                                 name + (" (on the CPU: CUDA out of memory)" if on_cpu else ""))
                with times.stage("wait_write"):
                    while writes:
                        writes.popleft().result()
                if cpu_fallback:  # the manifest is written when the writer closes, below
                    writer.manifest_extra.update(cpu_fallback=list(cpu_fallback),
                                                 warnings=list(plan.warnings))
            finally:  # never leave the writer (or its abort) racing the threads
                for _, pending in reads:
                    pending.cancel()
                for pending in writes:
                    if not pending.cancel():
                        pending.exception()
    finally:
        for folder in folders:
            folder.buffers = None
        pool.clear()
        plan.close()
        if own_stats is not None:
            own_stats.close()
    timings = {"wall": round(time.perf_counter() - started, 3), **times.seconds(),
               "cpu": times.cpu_seconds()}
    return MergeResult(out=Path(out), tensors=len(layout), seconds=time.perf_counter() - started,
                       device=str(device), warnings=plan.warnings, evaluation=evaluation or None,
                       timings=timings)


def merge_state_dicts(
    method_name: str,
    base: dict[str, torch.Tensor] | None,
    finetunes: list[dict[str, torch.Tensor]],
    model_params: list[dict],
    params: dict | None = None,
    *,
    seed: int = 0,
    num_layers: int | None = None,
    device: torch.device | str | None = None,
    stats_provider: Callable[[str], list[torch.Tensor] | None] | None = None,
    out_dtype: torch.dtype | None = None,
    spec: MergeSpec | None = None,
    overflow: str = "refuse",
) -> dict[str, torch.Tensor]:
    """In-memory merge of state dicts (for what-if tuning): the same per-tensor path as
    run_merge (``MergeSpec.merge_into``). Results keep each layout tensor's dtype unless
    ``out_dtype`` is given (for float tensors: integer and bool ones keep theirs). A prebuilt
    ``spec`` skips parameter parsing (what-if reuse); ``overflow`` as the recipe's key."""
    if spec is None:
        spec = MergeSpec.build(method_name, [dict(params or {})], model_params,
                               num_layers=num_layers, seed=seed)
    if spec.method.stats is not None and stats_provider is None:
        raise ParameterError(f"{spec.method.name} needs calibration statistics "
                             f"({spec.method.stats}); see engine.merge.calibration")
    if len(spec.model_scopes) != len(finetunes):
        raise ParameterError(f"{spec.method.name}: {len(spec.model_scopes)} per-model parameter "
                             f"sets for {len(finetunes)} models")
    device = resolve_device(device)
    layout = base if base is not None else finetunes[0]
    first = spec.first_pass_names(list(layout))
    if first:  # recomputed on every call: a reused spec may see other inputs
        spec.first_pass(first, lambda name: (base[name] if base is not None else None,
                                             [ft[name] for ft in finetunes]), device=device)
    out = {}
    for name, ref in layout.items():
        stats = stats_provider(name) if stats_provider is not None else None
        dtype = out_dtype if out_dtype is not None and ref.is_floating_point() else ref.dtype
        merged = torch.empty(ref.shape, dtype=dtype)
        out[name] = _merge_into(spec, name, base[name] if base is not None else None,
                                [ft[name] for ft in finetunes], merged, device=device, stats=stats,
                                cpu_fallback=[], overflow=overflow)
    return out


__all__ = ["DTYPES", "MergePlan", "MergeResult", "MergeSpec", "merge_state_dicts", "plan_merge",
           "run_merge"]
