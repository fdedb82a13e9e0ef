"""A merge method bound to its parameter settings, resolved per tensor; shared by every merge path.

The streaming executor (``run_merge``), the in-memory merge (``merge_state_dicts``) and the
what-if session all build one ``MergeSpec`` and call ``spec.merge_tensor(name, ...)``, so the
three can never drift apart. A method with a model-wide statistic (EMR's one rescaler per task
for the whole model) gets it from ``spec.first_pass(names, read)``, which every caller runs
before the first tensor is merged: one streaming read of every tensor, each tensor's part
summed in float64, nothing else kept.

Parameter scopes follow mergekit (mergekit/config.py, ``ConfigReader.parameter``): a per-model
value wins over the slice's ``parameters``, which wins over the recipe's top-level
``parameters``; a scope whose filters do not match the tensor falls through to the next one.
A per-model parameter (``weight``, ``density``, ...) set in an outer scope is every model's
default.

Keys that do not apply (mergekit reads only the names a method declares and silently ignores
every other key):
  - a parameter some merge method takes (one of ours, or mergekit's) but this method does not,
    e.g. ``int8_mask`` or ``density`` on ``linear``: accepted, ignored, with a warning;
  - a global parameter of this method set per model (mergekit reads global parameters from the
    slice and top-level scopes only): ignored, with a warning;
  - a key no method knows (a typo such as ``wieght``): refused, naming the key and the method.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import torch
from pydantic import BaseModel

from engine.errors import IncompatibleModelsError, NonFiniteError, ParameterError
from engine.merge import chunked
from engine.merge.common import count_nonfinite, work_dtype
from engine.merge.params import resolve_all
from engine.merge.registry import MergeMethod, get_method, list_methods
from engine.tensor_names import layer_index_of


def _stage(times, name: str):
    """``times.stage(name)`` (an engine.io.stages.StageTimes), or nothing without one."""
    return times.stage(name) if times is not None else nullcontext()

# Parameter names of mergekit's merge methods (mergekit/merge_methods/*: parameters() and
# tensor_parameters(), and the keyword arguments of its easy_define methods). A recipe written
# for mergekit may carry any of them; a method that does not take one ignores it.
MERGEKIT_PARAMETER_NAMES = frozenset({
    "weight", "density", "gamma", "epsilon", "int8_mask", "normalize", "rescale", "lambda", "t",
    "filter_wise", "max_iter", "tol", "nuslerp_row_wise", "nuslerp_flatten", "normalize_weights",
    "eps", "scale", "select_topk", "r", "alpha",
})
# Keys the executor itself reads (calibration of fisher/regmean); never passed to a method.
CALIBRATION_KEY = "calibration"          # global: {data, n, seed, batch_size}; per model: overrides
CALIBRATION_TASK_KEY = "calibration_task"  # per model: the task its statistics are computed on
EXECUTOR_GLOBAL_KEYS = frozenset({CALIBRATION_KEY})
EXECUTOR_MODEL_KEYS = frozenset({CALIBRATION_TASK_KEY, CALIBRATION_KEY})


class IgnoredParameterWarning(UserWarning):
    """A recipe parameter that does not apply to the chosen method was ignored."""


def field_names(cls: type[BaseModel]) -> set[str]:
    """Field names and aliases of a params class (mergekit spells lambda_ as 'lambda')."""
    out = set()
    for key, info in cls.model_fields.items():
        out.add(key)
        if info.alias:
            out.add(info.alias)
    return out


@cache
def known_parameter_names() -> frozenset[str]:
    """Every parameter name some method takes: ours, mergekit's, the executor's."""
    names = set(MERGEKIT_PARAMETER_NAMES) | EXECUTOR_GLOBAL_KEYS | EXECUTOR_MODEL_KEYS
    for name in list_methods():
        method = get_method(name)
        names |= field_names(method.params_class) | field_names(method.model_params_class)
    return frozenset(names)


def _tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed that does not depend on the order tensors are processed in."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class MergeSpec:
    """A method and its parameter settings, split by scope and checked once (see module doc)."""

    method: MergeMethod
    global_scopes: list[dict]          # outer to inner: the method's global keys only
    model_default_scopes: list[dict]   # per-model keys set in the global scopes, outer to inner
    model_scopes: list[dict]           # one per input model: its per-model keys
    num_layers: int | None = None
    seed: int = 0
    calibration: dict | None = None            # raw `calibration` mapping (fisher/regmean)
    calibration_tasks: list[str | None] = field(default_factory=list)
    calibration_models: list[dict | None] = field(default_factory=list)  # per-model `calibration`
    warnings: list[str] = field(default_factory=list)
    # A tensor's position in the layer stack its gradients run over (default: the block index
    # in its name); a frankenmerge slice gives its own layers 0..n-1 (``engine.merge.slices``).
    layer_of: Callable[[str], int | None] | None = None
    model_stat: torch.Tensor | None = None     # the summed first-pass statistic (see first_pass)
    _first_pass_done: bool = field(default=False, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(
        cls,
        method: MergeMethod | str,
        global_scopes: Sequence[Mapping[str, Any] | None],
        model_scopes: Sequence[Mapping[str, Any] | None],
        *,
        num_layers: int | None = None,
        seed: int = 0,
        warn: bool = True,
        layer_of: Callable[[str], int | None] | None = None,
    ) -> "MergeSpec":
        """Sort every key into its scope; ignore (with a warning) what does not apply; refuse
        unknown keys. ``global_scopes`` outer to inner (recipe, then slice parameters)."""
        method = get_method(method) if isinstance(method, str) else method
        global_names = field_names(method.params_class)
        model_names = field_names(method.model_params_class)
        known = known_parameter_names()
        takes_stats = method.stats is not None
        notes: list[str] = []

        def unknown(key: str, where: str) -> ParameterError:
            takes = sorted(global_names | model_names | (EXECUTOR_GLOBAL_KEYS | EXECUTOR_MODEL_KEYS
                                                         if takes_stats else set()))
            return ParameterError(
                f"unknown parameter {key!r} {where} for merge method {method.name!r} "
                f"(no merge method takes it); {method.name} takes: {', '.join(takes) or 'nothing'}")

        def ignore(key: str, why: str) -> None:
            note = f"{method.name}: parameter {key!r} ignored ({why})"
            if note not in notes:
                notes.append(note)

        calibration = None
        globals_out, defaults_out = [], []
        for scope in global_scopes:
            g, d = {}, {}
            for key, value in dict(scope or {}).items():
                if key in global_names:
                    g[key] = value
                elif key in model_names:
                    d[key] = value
                elif key in EXECUTOR_GLOBAL_KEYS and takes_stats:
                    calibration = value
                elif key in known:
                    ignore(key, f"{method.name} does not take it; mergekit ignores it too")
                else:
                    raise unknown(key, "in the recipe's parameters")
            globals_out.append(g)
            defaults_out.append(d)
        models_out, tasks, own_calibrations = [], [], []
        for i, scope in enumerate(model_scopes):
            m, task, own = {}, None, None
            for key, value in dict(scope or {}).items():
                if key in model_names:
                    m[key] = value
                elif key == CALIBRATION_TASK_KEY and takes_stats:
                    task = value
                elif key == CALIBRATION_KEY and takes_stats:
                    if not isinstance(value, Mapping):
                        raise ParameterError(f"{method.name}: model {i}'s '{CALIBRATION_KEY}' must "
                                             f"be a mapping such as {{data: FILE.jsonl}}, got {value!r}")
                    own = dict(value)
                elif key in global_names:
                    ignore(key, "a global parameter set per model; mergekit reads it only from "
                                "the recipe's or the slice's parameters")
                elif key in known:
                    ignore(key, f"{method.name} does not take it; mergekit ignores it too")
                else:
                    raise unknown(key, f"in model {i}'s parameters")
            models_out.append(m)
            tasks.append(task)
            own_calibrations.append(own)
        if calibration is not None and not isinstance(calibration, Mapping):
            raise ParameterError(f"{method.name}: '{CALIBRATION_KEY}' must be a mapping such as "
                                 f"{{n: 64, seed: 0}}, got {calibration!r}")
        if warn:
            for note in notes:
                warnings.warn(note, IgnoredParameterWarning, stacklevel=3)
        return cls(method=method, global_scopes=globals_out, model_default_scopes=defaults_out,
                   model_scopes=models_out, num_layers=num_layers, seed=seed,
                   calibration=dict(calibration) if calibration is not None else None,
                   calibration_tasks=tasks, calibration_models=own_calibrations, warnings=notes,
                   layer_of=layer_of)

    # ------------------------------------------------------------------ per tensor
    def tensor_params(self, name: str) -> tuple[BaseModel, list[BaseModel]]:
        """Validated (global, per-model) parameters for one tensor; cached per name."""
        hit = self._cache.get(name)
        if hit is not None:
            return hit
        method = self.method
        layer = (self.layer_of or layer_index_of)(name)
        num_layers = self.num_layers if layer is not None else None
        if layer is not None and (num_layers is None or layer >= num_layers):
            num_layers = layer + 1
        resolved: dict = {}
        for scope in self.global_scopes:
            resolved.update(resolve_all(scope, name, layer, num_layers))
        params = method.parse_params(resolved)
        defaults: dict = {}
        for scope in self.model_default_scopes:
            defaults.update(resolve_all(scope, name, layer, num_layers))
        per_model = [{**defaults, **resolve_all(scope, name, layer, num_layers)}
                     for scope in self.model_scopes]
        model_params = method.parse_model_params(per_model)
        method.validate(params, model_params)
        self._cache[name] = (params, model_params)
        return params, model_params

    def check(self, names: Sequence[str]) -> None:
        """Resolve every tensor's parameters now, so a bad gradient or filter fails at once."""
        for name in names:
            self.tensor_params(name)

    # ------------------------------------------------------------------ model-wide first pass
    def first_pass_names(self, names: Sequence[str]) -> list[str]:
        """The tensors whose parameters use the method's model-wide statistic (none for most
        methods, and for EMR with ``rescale: per_tensor``)."""
        if not self.method.model_stat:
            return []
        return [n for n in names if self.method.uses_model_statistic(self.tensor_params(n)[0])]

    def first_pass(
        self,
        names: Sequence[str],
        read: Callable[[str], tuple[torch.Tensor | None, Sequence[torch.Tensor]]],
        *,
        device: torch.device | str = "cpu",
        labels: tuple[str | None, Sequence[str]] | None = None,
    ) -> None:
        """Sum the method's per-tensor statistic over every tensor that uses it, reading each
        with ``read(name) -> (base, models)`` and dropping it at once; store it in
        ``model_stat``. Integer and bool tensors (copied, never merged) take no part. Must run
        before ``merge_tensor`` for a method with a model-wide statistic; a no-op otherwise."""
        device = torch.device(device)
        total = None
        for name in self.first_pass_names(names):
            base, models = read(name)
            inputs = [*models, *([base] if base is not None else [])]
            if not all(t.is_floating_point() for t in inputs):
                continue
            params, model_params = self.tensor_params(name)
            use_base = base if self.method.requires_base else None
            try:
                part = self._statistic(name, use_base, models, model_params, params, device)
            except torch.OutOfMemoryError:
                if device.type != "cuda":
                    raise
                part = None
            except NonFiniteError:
                _name_nonfinite(name, base, models, labels)
                raise
            if part is None:  # CUDA out of memory: the same arithmetic on the CPU
                torch.cuda.empty_cache()
                part = self._statistic(name, use_base, models, model_params, params,
                                       torch.device("cpu"))
            total = part if total is None else total + part
        self.model_stat = total
        self._first_pass_done = True

    def _statistic(self, name, base, models, model_params, params, device) -> torch.Tensor:
        dtype = work_dtype([*models, *([base] if base is not None else [])])
        base_w = base.to(device=device, dtype=dtype) if base is not None else None
        part = self.method.model_statistic(base_w, [t.to(device=device, dtype=dtype) for t in models],
                                           model_params, params, name=name)
        return part.to("cpu", torch.float64)

    def generator(self, name: str) -> torch.Generator | None:
        if not self.method.randomized:
            return None
        generator = torch.Generator()  # masks drawn on the CPU: same on CUDA and CPU
        generator.manual_seed(_tensor_seed(self.seed, name))
        return generator

    def merge_tensor(
        self,
        name: str,
        base: torch.Tensor | None,
        models: Sequence[torch.Tensor],
        *,
        device: torch.device | str = "cpu",
        stats=None,
        times=None,
    ) -> torch.Tensor:
        """Merge one tensor in fp32 (fp64 when an input is fp64) on ``device``; the result
        comes back in that dtype on the CPU.

        Inputs already of that dtype on ``device`` are used as they are (no copy); methods never
        write into their inputs. The method checks its result for NaN/Inf. ``times`` (a
        StageTimes) gets the seconds of the conversions (``convert``) and the method (``merge``).
        """
        params, model_params = self.tensor_params(name)
        device = torch.device(device)
        dtype = work_dtype([*models, *([base] if base is not None else [])])
        with _stage(times, "convert"):
            base32 = base.to(device=device, dtype=dtype) if base is not None else None
            models32 = [t.to(device=device, dtype=dtype) for t in models]
        extra = {}
        if self.method.uses_model_statistic(params):
            if not self._first_pass_done:
                raise ParameterError(f"{self.method.name} needs its model-wide first pass "
                                     "(MergeSpec.first_pass) before any tensor is merged",
                                     tensor=name)
            extra["model_stat"] = self.model_stat
        with _stage(times, "merge"):
            out = self.method.merge(base32, models32, model_params, params, name=name,
                                    generator=self.generator(name), stats=stats, **extra)
        with _stage(times, "convert"):
            return out.to("cpu")

    def merge_into(
        self,
        name: str,
        base: torch.Tensor | None,
        models: Sequence[torch.Tensor],
        out: torch.Tensor,
        *,
        device: torch.device | str = "cpu",
        stats=None,
        labels: tuple[str | None, Sequence[str]] | None = None,
        overflow: str = "refuse",
        times=None,
    ) -> torch.Tensor:
        """Merge one tensor into ``out`` (a CPU tensor of the output dtype and shape).

        Integer and bool tensors are never mixed arithmetically: they are copied from the base
        (the first model without one) when every input equals it, else refused. When every
        input is the same tensor (a model merged with itself), the result is that tensor, bit
        for bit, for every method whose result is then its input.

        On the CPU, linear and the deterministic task-vector methods run as chunked kernels
        (``engine.merge.chunked``: the same arithmetic, bitwise, several times faster, no fp32 copy
        of whole tensors); everything else goes through ``merge_tensor`` and is cast once.
        The values written are checked after that cast: one that overflows the output dtype
        (3e38 in float16 is Inf) is refused naming the tensor, or clamped to the dtype's finite
        range with ``overflow="clamp"`` (the recipe's ``overflow`` key).
        ``labels`` = (base label, model labels) name inputs in NaN/Inf errors. ``times`` (a
        StageTimes) gets seconds per stage: ``convert`` (to the work dtype and back; inside
        ``merge`` for the chunked kernels, which convert chunk by chunk), ``merge``, ``check``."""
        params, model_params = self.tensor_params(name)
        device = torch.device(device)
        named = _labelled(base, models, labels)
        if not out.is_floating_point() or not all(t.is_floating_point() for _, t in named):
            with _stage(times, "merge"):
                return _copy_exact(name, named, out)
        with _stage(times, "check"):
            same = bool(models) and _all_equal([t for _, t in named])
        keeps = getattr(self.method.module, "keeps_copies", None)  # passthrough: not with a scale
        if same and (keeps is None or keeps(params, model_params)) and (
                base is not None if self.method.requires_base else getattr(params, "normalize", True)):
            # zero task vectors (or a normalised mean of copies): the input itself, exactly,
            # which float32 arithmetic (a weighted mean, an SVD) would only approximate
            label, ref = named[0]
            with _stage(times, "check"):
                bad = count_nonfinite(ref)
            if bad:
                raise NonFiniteError(f"{bad} NaN/Inf value(s) in an input; merge refused",
                                     path=label, tensor=name)
            with _stage(times, "convert"):
                out.copy_(ref)
            with _stage(times, "check"):
                return _check_cast(name, out, overflow)
        use_base = base if (self.method.requires_base or self.method.optional_base) else None
        if (device.type == "cpu" and stats is None and chunked.supports(self.method, params, len(models))
                and all(t.is_floating_point() and t.dtype != torch.float64  # the kernels are fp32 only
                        for t in [*models, *([use_base] if use_base is not None else [])])
                and all(tuple(t.shape) == tuple(out.shape) for t in models)
                and (use_base is not None or not self.method.requires_base)  # else the method's error
                and (use_base is None or tuple(use_base.shape) == tuple(out.shape))):
            names = None
            if labels is not None:
                names = ([labels[0] or "base"] if use_base is not None else []) + list(labels[1])
            with _stage(times, "merge"):
                checked = chunked.merge_checked(self.method, use_base, models, model_params, params,
                                                out, labels=names, name=name,
                                                generator=self.generator(name))
            if checked:
                return out  # every value written was checked finite as it was cast
            with _stage(times, "check"):
                return _check_cast(name, out, overflow)
        try:
            merged = self.merge_tensor(name, base, models, device=device, stats=stats, times=times)
        except NonFiniteError:
            _name_nonfinite(name, base, models, labels)
            raise
        if tuple(merged.shape) != tuple(out.shape):
            raise ParameterError(f"merged shape {tuple(merged.shape)} differs from the output's "
                                 f"{tuple(out.shape)}", tensor=name)
        with _stage(times, "convert"):
            out.copy_(merged)
        with _stage(times, "check"):
            return _check_cast(name, out, overflow)


def _name_nonfinite(name: str, base: torch.Tensor | None, models: Sequence[torch.Tensor],
                    labels: tuple[str | None, Sequence[str]] | None) -> None:
    """Raise the NaN/Inf error again naming the model folder holding them (when labelled)."""
    if labels is None:
        return
    for label, t in zip([labels[0], *labels[1]], [base, *models]):
        bad = count_nonfinite(t) if t is not None and t.is_floating_point() else 0
        if bad:
            raise NonFiniteError(f"{bad} NaN/Inf value(s) in an input; merge refused",
                                 path=label, tensor=name) from None


def _labelled(base: torch.Tensor | None, models: Sequence[torch.Tensor],
              labels: tuple[str | None, Sequence[str]] | None) -> list[tuple[str, torch.Tensor]]:
    """(label, tensor) of every input, the base first when there is one."""
    base_label = (labels[0] if labels is not None else None) or "base"
    model_labels = list(labels[1]) if labels is not None else [f"input {i}" for i in range(len(models))]
    return ([(base_label, base)] if base is not None else []) + list(zip(model_labels, models))


def _all_equal(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every tensor equals the first (dtype, shape, values). Fine-tunes differ almost
    everywhere, but ``torch.equal`` scans large blocks before it stops: a short prefix is
    compared first, so different tensors are told apart at once."""
    first = tensors[0]

    def same(t: torch.Tensor) -> bool:
        if t is first:
            return True
        if t.dtype != first.dtype or t.shape != first.shape:
            return False
        if t.dim() and t.numel() > _PREFIX and t.is_contiguous() and first.is_contiguous():
            if not torch.equal(t.reshape(-1)[:_PREFIX], first.reshape(-1)[:_PREFIX]):
                return False
        return torch.equal(t, first)

    return all(same(t) for t in tensors[1:])


_PREFIX = 4096


def _copy_exact(name: str, named: list[tuple[str, torch.Tensor]], out: torch.Tensor) -> torch.Tensor:
    """An integer or bool tensor: the base's (first input's) copy when every input equals it.
    Averaging token ids or masks in float32 gives nonsense (slerp of bool masks is True
    everywhere; int64 beyond 2**24 is rounded), so a difference is refused, naming the input."""
    ref_label, ref = named[0]
    for label, t in named:
        if t.dtype != out.dtype:
            raise IncompatibleModelsError(
                f"{t.dtype} here, {out.dtype} in the output: integer and bool tensors are copied, "
                "never converted or merged", path=label, tensor=name)
        if t is not ref and not torch.equal(t, ref):
            raise IncompatibleModelsError(
                f"this {t.dtype} tensor differs from the one in {ref_label}: integer and bool "
                "tensors are copied from the base, never merged arithmetically", path=label,
                tensor=name)
    out.copy_(ref)
    return out


def _check_cast(name: str, out: torch.Tensor, overflow: str) -> torch.Tensor:
    """Check the values written, after the cast to the output dtype: a finite float32 result
    beyond float16's range is Inf there. One pass over the tensor already in memory: a sum
    (finite only when every value is; several times faster than ``isfinite`` on bf16), and
    an exact look only when it is not."""
    if out.numel() == 0:
        return out
    acc = torch.float64 if out.dtype == torch.float64 else torch.float32
    if bool(torch.isfinite(out.sum(dtype=acc))) or bool(torch.isfinite(out).all()):
        return out
    info = torch.finfo(out.dtype)
    if overflow == "clamp":
        out.clamp_(min=info.min, max=info.max)  # Inf -> the largest finite value; NaN stays
        if bool(torch.isfinite(out).all()):
            return out
    elif overflow != "refuse":
        raise ParameterError(f"overflow must be 'refuse' or 'clamp', got {overflow!r}", tensor=name)
    nan = int(torch.isnan(out).sum())
    if nan:
        raise NonFiniteError(f"the merge produced {nan} NaN value(s); refused", tensor=name)
    inf = int(torch.isinf(out).sum())
    dtype = str(out.dtype).removeprefix("torch.")
    raise NonFiniteError(
        f"{inf} merged value(s) overflow the output dtype {dtype} (beyond ±{info.max:g}); "
        "refused (set `overflow: clamp` in the recipe to write the largest finite value "
        "instead)", tensor=name)


__all__ = ["CALIBRATION_KEY", "CALIBRATION_TASK_KEY", "IgnoredParameterWarning",
           "MERGEKIT_PARAMETER_NAMES", "MergeSpec", "known_parameter_names"]
