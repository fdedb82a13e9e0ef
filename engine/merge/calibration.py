"""Calibration statistics for ``fisher`` and ``regmean``, from the zoo's task prompts or the
user's own JSONL file.

Each model is calibrated on its own task: ``n`` training-split examples of that task
(``engine.evaluate.tasks.train_stream``, seeded per task, never the held-out split), each a
prompt followed by its answer and the end-of-sequence token, as the zoo was trained. Or, given
``calibration: {data: FILE.jsonl}``, on ``n`` examples of the file's dev split
(``engine.evaluate.calibration_data``: never its held-out half), encoded the same way.

The statistics themselves (diagonal Fisher for ``fisher``, input Gram matrices for
``regmean``) are computed in ``engine.merge.fisher_gram``; this module decides what each
model is calibrated on and carries the statistics to the merge.

What a model is calibrated on, most specific first: its own ``calibration: {data: FILE}``
(per-model parameters; its other keys override the global ``calibration`` for that model), its
``calibration_task`` (a task name, a list of names, or ``all``), the recipe's global
``calibration: {data: FILE}``, else the task in the ``zoo.json`` of the zoo the model folder
belongs to (a zoo base, which has no task, is calibrated on all tasks). Settings: the recipe's
``parameters: {calibration: {data: FILE, n: 64, seed: 0, batch_size: 16}}``. A data path passes
the recipe's path rules (``engine.recipe.resolve_data_ref``: inside the allowed roots for the app
and its jobs, relative to the recipe's folder on the command line). The tokenizer is the model's
own (a LoRA adapter without one takes its base's).

Models are loaded one at a time, in fp32 (a LoRA adapter as base + adapter, tensor by tensor).
For a streamed merge (``stats_provider_for_plan``) each model's statistics are written to a
safetensors file in a private temporary folder as soon as the model is done, and read back one
tensor at a time while the merge streams, so memory holds one model and its statistics, never N
models' (a model-sized Fisher per model, a Gram per linear layer per model); the folder is
removed when the merge ends. The in-memory what-if keeps them in RAM (it holds every model
anyway).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine.errors import DeltaWorkbenchError, ParameterError
from engine.evaluate.calibration_data import CalibrationData
from engine.evaluate.tasks import MAIN_TASKS, TASKS, train_stream
from engine.io.staging import discard_staging, make_scratch_dir
from engine.merge.common import derive_seed
from engine.merge.fisher_gram import fisher_diagonal, gram_matrices
from engine.merge.methods.regmean import GramStats

Example = tuple[str, str]
StatsProvider = Callable[[str], object]
ALL_TASKS = "all"


class CalibrationSettings(BaseModel):
    """The recipe's ``calibration`` mapping."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    data: str | None = Field(None, description="A JSONL file of {prompt, answer} lines: calibrate "
                                               "on n examples of its dev split.")
    n: int = Field(64, ge=1, le=100_000, description="Calibration examples per model.")
    seed: int = Field(0, ge=0, description="Seed of the example draw (per task).")
    batch_size: int = Field(16, ge=1, le=4096, description="Examples per forward pass (Gram matrices).")


def parse_settings(raw) -> CalibrationSettings:
    if isinstance(raw, CalibrationSettings):
        return raw
    try:
        return CalibrationSettings.model_validate(dict(raw or {}))
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'calibration'}: {e['msg']}"
                             for e in err.errors())
        raise ParameterError(f"calibration: {problems}") from None


# ---------------------------------------------------------------------- examples
def task_list(task: str | Sequence[str]) -> list[str]:
    """Task names from a name, a list of names, or 'all' (every main zoo task)."""
    names = list(MAIN_TASKS) if task == ALL_TASKS else [task] if isinstance(task, str) else list(task)
    unknown = [t for t in names if t not in TASKS]
    if not names or unknown:
        raise ParameterError(f"calibration task(s) {unknown or names!r} unknown; known: "
                             f"{', '.join(TASKS)} or {ALL_TASKS!r}")
    return names


def calibration_examples(task: str | Sequence[str], n: int, seed: int = 0) -> list[Example]:
    """``n`` training-split examples, drawn in turn from each named task (seeded per task)."""
    names = task_list(task)
    streams = [train_stream(TASKS[t], random.Random(derive_seed(seed, f"calibration:{t}")))
               for t in names]
    return [next(streams[i % len(streams)]) for i in range(n)]


def encode(tokenizer, examples: Sequence[Example]) -> list[tuple[list[int], int]]:
    """(token ids of prompt + answer + eos, prompt length) per example, as the zoo trains."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ParameterError("calibration needs a tokenizer with an end-of-sequence token")
    out = []
    for prompt, answer in examples:
        p = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        a = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
        out.append((p + a + [eos], len(p)))
    return out


# ---------------------------------------------------------------------- tasks of models
def zoo_task_of(folder: str | Path) -> str | None:
    """The task a zoo model was trained for, from the ``zoo.json`` of an enclosing folder (the
    one rule for merge and compress calibration): a fine-tune's task; ALL_TASKS for a zoo base
    without one (it was pretrained on every main task, so its statistics cover them all);
    None for a folder in no zoo, in a zoo.json this engine cannot read, or an entry whose task
    is not a name."""
    from engine.zoo import MANIFEST_NAME, load_manifest

    folder = Path(folder).resolve()
    for root in list(folder.parents)[:4]:
        if not (root / MANIFEST_NAME).is_file():
            continue
        try:  # the zoo's own checked reader: bounded, strict, entries inside the zoo
            manifest = load_manifest(root)
        except DeltaWorkbenchError:
            return None
        for entry in manifest["models"]:
            if Path(entry["abs_path"]) == folder:  # load_manifest resolved it
                task = entry.get("task")
                if isinstance(task, str) and task:
                    return task
                return ALL_TASKS if task is None and entry["role"] == "base" else None
        return None
    return None


def resolve_tasks(folders: Sequence[str | Path], explicit: Sequence[str | list[str] | None]) -> list:
    tasks = []
    for folder, task in zip(folders, explicit):
        task = task if task is not None else zoo_task_of(folder)
        if task is None:
            raise ParameterError(
                f"no calibration task for model {folder}: it is not in a zoo (zoo.json); set its "
                f"per-model parameter calibration_task (one of {', '.join(TASKS)} or {ALL_TASKS!r}) "
                "or give calibration data (calibration: {data: FILE.jsonl})")
        task_list(task)  # checks the names
        tasks.append(task)
    return tasks


# ---------------------------------------------------------------------- what each model sees
def examples_of(source, settings: CalibrationSettings) -> list[Example]:
    """The examples a model is calibrated on: ``n`` of a zoo task spec's training split, or of a
    ``CalibrationData``'s dev split (all of it when it holds fewer)."""
    if isinstance(source, CalibrationData):
        return source.draw(settings.n, settings.seed)
    return calibration_examples(source, settings.n, settings.seed)


def source_key(source) -> tuple:
    """A hashable, content-aware key of a calibration source (for caches)."""
    if isinstance(source, CalibrationData):
        return ("data", str(source.path), source.digest)
    return ("task", source if isinstance(source, str) else tuple(source))


DataResolver = Callable[[str, int | None], tuple[Path, str]]


def calibration_sources(spec, models: Sequence, resolve_data: DataResolver
                        ) -> tuple[list, list[CalibrationSettings], list[str]]:
    """Per model (a path or an opened folder): what it is calibrated on (a zoo task spec or a
    ``CalibrationData``; the order is the module docstring's), its settings (the global
    ``calibration`` updated by its own), and the warnings (a dev split smaller than ``n``).
    ``resolve_data(ref, model index, or None for the global key)`` -> (file, what names it).
    Every data file is read and checked here, before any model is loaded."""
    count = len(models)
    tasks = list(spec.calibration_tasks or [None] * count)
    owns = list(spec.calibration_models or [None] * count)
    shared = dict(spec.calibration or {})
    files: dict[Path, CalibrationData] = {}
    sources, settings, notes = [], [], []
    for i, (model, task, own) in enumerate(zip(models, tasks, owns)):
        own = dict(own or {})
        if task is not None and own.get("data") is not None:
            raise ParameterError(f"model {i}: give calibration_task or calibration.data, not both")
        merged = parse_settings({**shared, **own})
        if task is None and merged.data is not None:
            path, named_by = resolve_data(merged.data, i if own.get("data") is not None else None)
            key = Path(path).resolve()
            if key not in files:
                files[key] = CalibrationData.read(path, named_by=named_by)
            source = files[key]
            note = source.shortfall(merged.n)
            if note is not None and note not in notes:
                notes.append(note)
        else:
            source = resolve_tasks([Path(getattr(model, "path", model))], [task])[0]
        sources.append(source)
        settings.append(merged)
    return sources, settings, notes


def recipe_data_resolver(recipe, recipe_dir=None, allowed_roots=None) -> DataResolver:
    """``resolve_data`` for a recipe's data references: the recipe's path rules, errors naming
    the (first) recipe key that names the file."""
    from engine.recipe import resolve_data_ref

    keys: dict[str, str] = {}
    for key, ref in recipe.calibration_data_refs():
        keys.setdefault(ref, key)
    roots = list(allowed_roots) if allowed_roots is not None else None

    def resolve(ref: str, index: int | None) -> tuple[Path, str]:
        key = keys.get(ref) or ("parameters.calibration.data" if index is None
                                else f"models[{index}].parameters.calibration.data")
        return (resolve_data_ref(ref, key=key, recipe_dir=recipe_dir, allowed_roots=roots),
                f"recipe key {key}")
    return resolve


# ---------------------------------------------------------------------- per model, provider
def model_statistics(kind: str, folder, task, settings: CalibrationSettings,
                     *, model=None, tokenizer=None) -> dict:
    """Fisher (``kind='fisher'``) or Gram (``kind='gram'``) statistics of one model: a folder
    path, an opened ``ModelFolder`` or LoRA ``AdapterFinetune``, or an already loaded
    ``model``/``tokenizer`` pair. ``task``: a zoo task spec or a ``CalibrationData``."""
    if model is None or tokenizer is None:
        from engine.evaluate.loading import load_finetune, load_model_folder

        model, tokenizer = (load_model_folder(folder) if isinstance(folder, (str, Path))
                            else load_finetune(folder))
    encoded = encode(tokenizer, examples_of(task, settings))
    if kind == "fisher":
        return fisher_diagonal(model, encoded)
    if kind == "gram":
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return gram_matrices(model, encoded, pad_id=pad, batch_size=settings.batch_size)
    raise ValueError(f"unknown statistics kind {kind!r}")


class StatsFile:
    """One model's statistics in a safetensors file, read back per tensor name.

    Same ``get(name)`` as the in-memory dict: a tensor (fisher) or ``(gram, transposed)``.
    A statistic shared under several names (a tied head) is stored once and aliased in the
    file's metadata."""

    def __init__(self, path: Path, kind: str):
        from safetensors import safe_open

        self.path, self.kind = Path(path), kind
        self._file = safe_open(str(self.path), framework="pt")
        meta = self._file.metadata() or {}
        self._alias = json.loads(meta.get("alias", "{}"))
        self._transposed = set(json.loads(meta.get("transposed", "[]")))

    @classmethod
    def write(cls, stats: dict, path: Path, kind: str) -> "StatsFile":
        from safetensors.torch import save_file

        tensors, alias, transposed, seen = {}, {}, [], {}
        for name, value in stats.items():
            tensor, flag = value if kind == "gram" else (value, False)
            key = (tensor.data_ptr(), tuple(tensor.shape))
            if key in seen:
                alias[name] = seen[key]
            else:
                seen[key] = name
                tensors[name] = tensor.contiguous()
            if flag:
                transposed.append(name)
        save_file(tensors, str(path), metadata={"alias": json.dumps(alias),
                                                "transposed": json.dumps(transposed)})
        return cls(path, kind)

    def get(self, name: str, default=None):
        stored = self._alias.get(name, name)
        if stored not in self._file.keys():
            return default
        tensor = self._file.get_tensor(stored)
        return (tensor, name in self._transposed) if self.kind == "gram" else tensor


class CalibrationStats:
    """Per-model statistics, served per tensor name as a merge method's ``stats``.

    fisher: ``[F_1, ..., F_N]`` for every parameter; a tensor that is not a parameter (a
    buffer) gets equal Fishers, so the plain weighted mean. regmean: ``GramStats`` for linear
    weights, None for everything else (the method then takes the weighted mean).
    """

    def __init__(self, kind: str, per_model: Sequence, *, shape_of: Callable | None = None,
                 folder: Path | None = None):
        if kind not in ("fisher", "gram"):
            raise ValueError(f"unknown statistics kind {kind!r}")
        self.kind = kind
        self.per_model = list(per_model)  # dicts, or StatsFile (anything with .get(name))
        self.shape_of = shape_of  # name -> something with .shape (buffers: equal Fishers)
        self.folder = folder  # the temporary folder of the StatsFiles, removed by close()

    def close(self) -> None:
        self.per_model = []
        if self.folder is not None:
            discard_staging(self.folder, [])
            self.folder = None

    def __call__(self, name: str, like: torch.Tensor | None = None):
        if self.kind == "fisher":
            found = [stats.get(name) for stats in self.per_model]
            if all(f is not None for f in found):
                return found
            if like is None and self.shape_of is not None:  # a buffer: its shape, from the layout
                like = self.shape_of(name)
            if like is None:
                return None
            return [torch.ones(like.shape, dtype=torch.float32)] * len(self.per_model)
        found = [stats.get(name) for stats in self.per_model]
        if any(f is None for f in found):
            return None
        return GramStats(grams=tuple(g for g, _ in found), transposed=found[0][1])


def compute_stats(kind: str, folders: Sequence[str | Path], tasks: Sequence, settings, *,
                  spill: bool = False, shape_of: Callable | None = None) -> CalibrationStats:
    """Every model's statistics; ``spill``: each written to disk as soon as it is computed
    (a private temporary folder that ``CalibrationStats.close()`` removes). ``settings``: one
    for every model, or a list of one per model."""
    per_model = ([parse_settings(x) for x in settings] if isinstance(settings, (list, tuple))
                 else [parse_settings(settings)] * len(folders))
    if not spill:
        return CalibrationStats(kind, [model_statistics(kind, f, t, c)
                                       for f, t, c in zip(folders, tasks, per_model)],
                                shape_of=shape_of)
    # A staging-convention scratch folder (owner lock, registry), not a bare temporary folder:
    # a run killed hard would otherwise leave model-sized statistics behind forever.
    folder = make_scratch_dir("calibration")
    try:
        files = []
        for i, (f, t, c) in enumerate(zip(folders, tasks, per_model)):
            stats = model_statistics(kind, f, t, c)
            files.append(StatsFile.write(stats, folder / f"model-{i:03d}.safetensors", kind))
            del stats  # only this model's statistics were ever in memory
    except BaseException:
        discard_staging(folder, [])
        raise
    return CalibrationStats(kind, files, shape_of=shape_of, folder=folder)


def stats_provider_for_plan(plan, *, recipe_dir=None, allowed_roots=None) -> CalibrationStats:
    """The executor's ``stats_provider`` for a fisher/regmean plan: calibrates every input
    model (on its data file or task, see the module docstring; data paths by the recipe's rules
    for ``recipe_dir``/``allowed_roots``), spilling each model's statistics to disk; the
    executor calls ``close()`` when the merge ends. A dev split smaller than ``n`` is a warning
    of the plan."""
    spec = plan.spec
    resolver = recipe_data_resolver(plan.recipe, recipe_dir, allowed_roots)
    sources, settings, notes = calibration_sources(spec, plan.models, resolver)
    plan.warnings.extend(note for note in notes if note not in plan.warnings)
    return compute_stats(spec.method.stats, plan.models, sources, settings, spill=True,
                         shape_of=plan.layout.info)


__all__ = ["CalibrationSettings", "CalibrationStats", "StatsFile", "calibration_examples",
           "calibration_sources", "compute_stats", "encode", "examples_of",
           "model_statistics", "recipe_data_resolver", "resolve_tasks",
           "source_key", "stats_provider_for_plan", "zoo_task_of"]
