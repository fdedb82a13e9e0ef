"""Run a merge recipe tensor by tensor: read, merge in fp32 (fp64 for fp64 tensors; on CUDA
when present), cast, check the cast values, write. Integer and bool tensors are copied.

Memory stays at a few tensors per input model: inputs are opened lazily (``ModelFolder``) and
only the tensor being merged, the few read ahead by a prefetch thread (at most ``READ_AHEAD``,
``READ_AHEAD_BYTES``) and the few merged ones waiting to be written and checked are in RAM.

Everything that can be checked before work starts is checked first: the recipe, every model
folder, the compatibility report (all mismatches at once), and the parameters resolved for
every tensor (gradients and filters), so a bad value fails in a second, not after an hour.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from engine.compat import embed_head_names, require_compatible
from engine.device import resolve_device
from engine.errors import ConfigError, DeltaWorkbenchError, ParameterError
from engine.export_card import CARD_NAME, merge_card
from engine.io import ModelFolder, ModelWriter
from engine.io.buffers import BufferPool
from engine.io.stages import StageTimes
from engine.io.side_files import TOKENIZER_FILES as SIDE_TOKENIZER_FILES
from engine.io.side_files import read_side_files
from engine.merge.registry import MergeMethod, get_method
from engine.merge.slices import LayerStack, num_layers_of, plan_layer_stack, stack_config
from engine.merge.spec import MergeSpec
from engine.merge.vocab import VocabPlan, build_vocab_plan, has_tokenizer, retemplated_files, tokenizer_path
from engine.lora.adapter import LoraAdapter, is_adapter_folder
from engine.lora.finetune import AdapterFinetune
from engine.task_vectors import read_model_tensor
from engine.tensor_names import layer_index_of
from engine.recipe import DTYPES, MergeRecipe, check_recipe_paths, resolve_model_ref, split_lora_ref

# Files copied from the tokenizer source next to the merged weights (when present).
TOKENIZER_FILES = (*SIDE_TOKENIZER_FILES, "generation_config.json")
RECIPE_FILE = "merge_recipe.yml"
# Reads queued ahead of the merge: up to this many tensors, and while the inputs queued stay
# under this many bytes (at least one tensor is always read ahead).
READ_AHEAD = 4
READ_AHEAD_BYTES = 256 * 2**20
WRITE_BEHIND = 2  # merged tensors waiting for the writer thread

Progress = Callable[[float, str], None]


@dataclass
class MergePlan:
    """A validated recipe bound to opened model folders."""

    recipe: MergeRecipe
    method: MergeMethod
    base: ModelFolder | None          # the base model (None for base-free methods without one)
    layout: ModelFolder               # whose tensor names/order/config the output follows
    models: list[ModelFolder]         # the inputs merged (the base excluded)
    spec: MergeSpec                   # the method with its parameters, resolved per tensor
    tokenizer_folder: ModelFolder
    vocab_target: int | None
    num_layers: int | None
    warnings: list[str] = field(default_factory=list)
    opened: list = field(default_factory=list)  # everything plan_merge opened (adapters' bases too)
    stack: LayerStack | None = None   # a frankenmerge: where each output tensor comes from
    vocab: VocabPlan | None = None    # a merged tokenizer: embedding rows follow tokens

    def close(self) -> None:
        for folder in {id(f): f for f in [self.layout, self.tokenizer_folder, *self.models,
                                           *([self.base] if self.base else []), *self.opened]}.values():
            folder.close()

    def input_paths(self) -> list[Path]:
        """Every folder the merge reads (an adapter's base included): never a destination."""
        paths = []
        for model in [self.layout, *self.models]:
            paths.append(model.path)
            if isinstance(model, AdapterFinetune):
                paths.append(model.base.path)
        return paths


@dataclass
class MergeResult:
    out: Path
    tensors: int
    seconds: float
    device: str
    warnings: list[str]
    evaluation: dict | None = None    # the merged model's zoo-task scores (``evaluate=True``)
    timings: dict | None = None       # seconds per stage (engine.io.stages), "wall" included


def plan_merge(recipe: MergeRecipe, *, recipe_dir: str | Path | None = None,
               allowed_roots: Iterable[str | Path] | None = None) -> MergePlan:
    """Open and check everything a merge needs; raise before any work on any problem.

    ``allowed_roots``: where the recipe's model folders must lie (the app and its jobs give
    ``settings.allowed_roots()``; the command line reads what its user names)."""
    method = get_method(recipe.merge_method)
    roots = list(allowed_roots) if allowed_roots is not None else None

    def _resolve_model_path(ref: str, key: str) -> Path:
        return resolve_model_ref(ref, key=key, recipe_dir=recipe_dir, allowed_roots=roots)

    if roots is not None:
        check_recipe_paths(recipe, roots, recipe_dir=recipe_dir)  # every key, before any is opened
    stacked = is_layer_stack(recipe, _resolve_model_path)
    entries = [] if stacked else recipe.input_models()
    base_path = (_resolve_model_path(split_lora_ref(recipe.base_model)[0], "base_model")
                 if recipe.base_model else None)
    if method.requires_base and base_path is None and not stacked:  # a stack's slices may name theirs
        raise ParameterError(f"{method.name} needs a base_model")

    opened: dict[Path, ModelFolder] = {}

    def open_folder(path: Path) -> ModelFolder:
        key = path.resolve()
        if key not in opened:
            opened[key] = ModelFolder(path)
        return opened[key]

    adapters: list[AdapterFinetune] = []

    def open_model(ref: str, key: str, base: ModelFolder | None):
        """A model folder, or a LoRA adapter over its base: ``BASE+ADAPTER`` names both, an
        adapter folder alone takes the recipe's base_model."""
        base_ref, adapter_ref = split_lora_ref(ref)
        path = _resolve_model_path(base_ref, key)
        if adapter_ref is not None:
            adapter_path = _resolve_model_path(adapter_ref, f"{key}+adapter")
            adapters.append(AdapterFinetune(open_folder(path), adapter_path))
            return adapters[-1]
        if is_adapter_folder(path):
            if base is None:  # the adapter's own base_model_name_or_path, when it is a local folder
                named = LoraAdapter(path).base_model_path()
                if named is None or not Path(named).is_absolute() or not Path(named).is_dir():
                    raise ConfigError(f"recipe key {key}: a LoRA adapter needs a base (write "
                                      "BASE+ADAPTER, or give base_model)", path=ref)
                base = open_folder(_resolve_model_path(named, f"{key} (the adapter's "
                                                              "base_model_name_or_path)"))
            adapters.append(AdapterFinetune(base, path))
            return adapters[-1]
        return open_folder(path)

    try:
        base = open_model(recipe.base_model, "base_model", None) if base_path is not None else None
        if stacked:
            plan = _plan_stack(recipe, method, base, open_model,
                               lambda: _tokenizer_folder(recipe, None, open_folder, _resolve_model_path),
                               _resolve_model_path)
            plan.opened = [*adapters, *opened.values()]
            return plan
        models, settings, keys = [], [], []
        entry_keys = [key for key, _ in recipe.model_refs() if key.endswith(".model")]
        for entry, key in zip(entries, entry_keys):
            if (base_path is not None and (method.requires_base or method.optional_base)
                    and split_lora_ref(entry.model)[1] is None
                    and _resolve_model_path(entry.model, key).resolve() == base_path.resolve()):
                continue  # mergekit lists the base among the models; it contributes as the base
            models.append(open_model(entry.model, key, base))
            settings.append(entry.parameters)
            keys.append(key)
        if not models:
            raise ParameterError(f"{method.name}: no models to merge besides the base")
        layout = base if base is not None else models[0]
        tokenizer_folder = _tokenizer_folder(recipe, layout, open_folder, _resolve_model_path)
        inputs = [*([("base_model", base)] if base is not None else []), *zip(keys, models)]
        merging_vocab = _merges_vocab(recipe, layout)

        report = require_compatible(layout, [m for m in models if m is not layout],
                                    vocab_policy="pad_from_base" if merging_vocab else recipe.vocab_policy)
        vocab = (build_vocab_plan(recipe, inputs, layout, resolve=_resolve_model_path,
                                  source_folder=tokenizer_folder, base_model=base)
                 if merging_vocab else None)
        if vocab is not None and method.stats is not None and not vocab.is_identity():
            raise ParameterError(f"recipe key {'tokenizer' if recipe.tokenizer else 'tokenizer_source'}: "
                                 f"{method.name} calibrates each model in its own vocabulary; a merged "
                                 "tokenizer that moves, adds or pads rows is not supported with it")
        num_layers = layout.config.get("num_hidden_layers", layout.config.get("n_layer"))
        if recipe.slices is not None and num_layers is not None:
            lo, hi = recipe.slices[0].sources[0].layer_range
            if (lo, hi) != (0, num_layers):  # only LoRA adapters get here (see is_layer_stack)
                raise ParameterError(f"recipe key slices[0]: layer_range {[lo, hi]} of a LoRA "
                                     f"adapter must cover all {num_layers} layers")

        spec = MergeSpec.build(method, recipe.parameter_scopes(), settings,
                               num_layers=num_layers, seed=recipe.seed)
        plan = MergePlan(
            recipe=recipe, method=method, base=base, layout=layout, models=models, spec=spec,
            tokenizer_folder=tokenizer_folder,
            vocab_target=None if vocab else report.info.get("vocab", {}).get("target"),
            num_layers=num_layers, vocab=vocab,
            warnings=list(report.warnings) + list(spec.warnings) + (vocab.warnings if vocab else []),
        )
        # Resolve and validate the parameters of every tensor now (cheap), so that a bad
        # gradient or filter value fails before any tensor is read.
        spec.check(layout.tensor_names)
    except BaseException:
        for folder in [*adapters, *opened.values()]:
            folder.close()
        raise
    plan.opened = [*adapters, *opened.values()]
    return plan


def is_layer_stack(recipe: MergeRecipe, resolve: Callable[[str, str], Path]) -> bool:
    """Whether a recipe stacks layer ranges (several slices, sources of different ranges, or
    one range short of the whole model) rather than merging whole models."""
    if recipe.slices is None:
        return False
    if not recipe.uniform_slice():
        return True
    first = recipe.slices[0].sources[0]
    base_ref, adapter_ref = split_lora_ref(first.model)
    path = resolve(base_ref, "slices[0].sources[0].model")
    if adapter_ref is not None or is_adapter_folder(path):
        return False  # LoRA adapters: whole models only (a partial range is refused in the plan)
    with ModelFolder(path) as folder:
        return tuple(first.layer_range) != (0, num_layers_of(folder))


def _merges_vocab(recipe: MergeRecipe, tokenizer_base: ModelFolder) -> bool:
    """Whether embedding rows follow a merged tokenizer (``engine.merge.vocab``): a ``tokenizer``
    mapping or ``tokenizer_source: union`` always; a legacy ``tokenizer_source`` naming base or
    a model when the tokenizer base has a tokenizer (else its files are copied as they are)."""
    if not recipe.merges_tokenizer():
        return False
    if recipe.tokenizer is not None or recipe.tokenizer_model() == "union":
        return True
    return has_tokenizer(tokenizer_path(tokenizer_base))


def _tokenizer_folder(recipe: MergeRecipe, layout: ModelFolder | None, open_folder,
                      resolve) -> ModelFolder | None:
    """The folder whose tokenizer files are written (``layout`` for "base")."""
    tok_ref = recipe.tokenizer_model()
    if tok_ref in ("base", "union"):
        return layout
    tok_key = "tokenizer.source" if recipe.tokenizer else "tokenizer_source"
    return open_folder(resolve(tok_ref, tok_key))


def _plan_stack(recipe: MergeRecipe, method: MergeMethod, base: ModelFolder | None,
                open_model, tokenizer_folder, resolve) -> MergePlan:
    """The plan of a layer stack (``engine.merge.slices``): every source and slice base opened,
    the models' non-layer tensors checked against the layout, every output tensor routed."""
    sources = [[open_model(s.model, f"slices[{i}].sources[{j}].model", base)
                for j, s in enumerate(piece.sources)] for i, piece in enumerate(recipe.slices)]
    bases = [open_model(piece.base_model, f"slices[{i}].base_model", None)
             if piece.base_model is not None else base for i, piece in enumerate(recipe.slices)]
    layout = base if base is not None else sources[0][0]
    distinct = list({id(f): f for f in [*(f for row in sources for f in row),
                                         *(b for b in bases if b is not None)]}.values())
    merging_vocab = _merges_vocab(recipe, layout)
    report = require_compatible(layout, [f for f in distinct if f is not layout], layer_stack=True,
                                vocab_policy="pad_from_base" if merging_vocab else recipe.vocab_policy)
    stack = plan_layer_stack(recipe, method, sources, bases, layout)
    models = [f for f in distinct if f is not layout]  # slice bases too: never a destination
    tokenizer = tokenizer_folder() or layout
    vocab = None
    if merging_vocab:
        keys = {id(f): f"slices[{i}].sources[{j}].model" for i, row in enumerate(sources)
                for j, f in reversed(list(enumerate(row)))}
        keys.update({id(b): (f"slices[{i}].base_model" if recipe.slices[i].base_model else "base_model")
                     for i, b in enumerate(bases) if b is not None})
        vocab = build_vocab_plan(recipe, [(keys[id(f)], f) for f in distinct], layout, resolve=resolve,
                                 source_folder=tokenizer, base_model=base)
    return MergePlan(recipe=recipe, method=method, base=base, layout=layout,
                     models=models or [sources[0][0]], spec=stack.specs[0],
                     tokenizer_folder=tokenizer,
                     vocab_target=None if vocab else report.info.get("vocab", {}).get("target"),
                     num_layers=len(stack.layer_sources), vocab=vocab,
                     warnings=list(report.warnings) + stack.warnings + (vocab.warnings if vocab else []),
                     stack=stack)


def _input_tensor(plan: MergePlan, folder: ModelFolder, name: str) -> torch.Tensor:
    """One model's tensor for an output name: tied heads read the embedding; vocab by policy."""
    embed, head = embed_head_names(folder)
    tensor = read_model_tensor(folder, name)  # compat has refused missing tensors already
    target = plan.vocab_target
    if target is not None and name in (embed, head) and tensor.dim() >= 1 and tensor.shape[0] != target:
        if tensor.shape[0] > target:
            tensor = tensor[:target]
        else:  # pad_from_base: rows the model lacks come from the base (a zero delta)
            base_rows = _input_tensor(plan, plan.layout, name)
            tensor = torch.cat([tensor, base_rows[tensor.shape[0]:target].to(tensor.dtype)])
    return tensor


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


def _read_inputs(plan: MergePlan, name: str) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """One tensor of every input, read without memory maps (NaN/Inf are caught by the merge,
    which names the folder)."""
    if plan.stack is not None:
        route = plan.stack.routes[name]
        pairs = [route.base] if route.base is not None else []
        pairs += route.models
    else:
        pairs = ([(plan.base, name)] if plan.base is not None else []) + [(m, name) for m in plan.models]
    has_base = plan.base is not None if plan.stack is None else route.base is not None
    tensors = [_input_tensor(plan, folder, source) for folder, source in pairs]
    if plan.vocab is not None and name in embed_head_names(plan.layout):
        # rows moved to the merged vocabulary by token, before the method sees them
        tensors = plan.vocab.permute([(folder, t) for (folder, _), t in zip(pairs, tensors)])
    return (tensors[0] if has_base else None), tensors[1 if has_base else 0:]


def output_layout(plan: MergePlan) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of every output tensor, in the layout's order (vocab by policy)."""
    embed, head = embed_head_names(plan.layout)
    out = []
    for name in (plan.stack.routes if plan.stack is not None else plan.layout.tensor_names):
        info = plan.layout.info(name) if name in plan.layout else None
        if plan.stack is not None and (info is None or layer_index_of(name) is not None):
            route = plan.stack.routes[name]
            folder, source = route.models[0]
            info = folder.info(source)
        shape = tuple(info.shape)
        if plan.vocab_target is not None and name in (embed, head) and shape and shape[0] != plan.vocab_target:
            shape = (plan.vocab_target, *shape[1:])
        if plan.vocab is not None and name in (embed, head):
            shape = (plan.vocab.rows, *shape[1:])
        out.append((name, plan.recipe.output_dtype(info.dtype), shape))
    return out


def output_config(plan: MergePlan) -> dict:
    config = dict(plan.layout.config)
    if plan.stack is not None:
        config = stack_config(config, plan.stack.layer_sources)
    if plan.recipe.dtype or plan.recipe.out_dtype:
        dtype_name = str(plan.recipe.output_dtype(torch.float32)).removeprefix("torch.")
        config["torch_dtype"] = dtype_name
        if "dtype" in config:
            config["dtype"] = dtype_name
    if plan.vocab_target is not None and config.get("vocab_size") not in (None, plan.vocab_target):
        config["vocab_size"] = plan.vocab_target
    if plan.vocab is not None:
        config["vocab_size"] = plan.vocab.rows
    return config


def tokenizer_files(folder: ModelFolder) -> dict[str, bytes]:
    """The tokenizer source's side files, vetted and read once (a symlink out of the folder, a
    FIFO or a config asking for code is refused, not copied)."""
    return read_side_files(folder.path, TOKENIZER_FILES)


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
            plan.spec.first_pass(first, lambda name: _read_inputs(plan, name), device=device,
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
            return _read_inputs(plan, name)

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
