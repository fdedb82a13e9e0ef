"""Delta analysis of a base and fine-tune(s): every per-tensor and pairwise metric, streamed,
read from and written to a metric cache when one is given.

``analyze(base, finetuned, params, cache=store)`` returns plain JSON-ready data::

    {"base": ..., "finetuned": [...], "engine_version": ..., "params": {...},
     "tensors": [{"name", "model", "shape", "fro_norm", "rel_norm", "top_singular_values",
                  "effective_rank", "stable_rank", "energy_k_50", ...}, ...],
     "pairs":   [{"name", "a", "b", "cosine", "sign_conflict", "topk_jaccard",
                  "principal_cosines", ...}, ...],
     "models":  {"cosine": task x task, "pairs": [{"a", "b", "cosine", "mean_sign_conflict", ...}]},
     "cache": {"path", "status", "hits", "misses", "written"}, "warnings": [...]}

``model`` / ``a`` / ``b`` index ``finetuned``. The cache is a ``engine.metric_cache.MetricCache``
(``cache.MetricStore``, or one of its views) or None; the engine never opens a database
itself. Cache keys (``engine.metric_cache``'s rule): the fingerprints of exactly the weight files a value was computed from
(the base shard and the fine-tune shard(s) holding the tensor), the tensor, the metric group
(``delta`` or ``pair``), the parameters that group depends on, and the engine version.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

import engine
from engine.analysis.similarity import PairParams, cosine_matrix, pair_metrics
from engine.analysis.spectra import SpectrumParams, as_matrix, compute_spectrum, finite_part, tensor_metrics
from engine.delta import iter_task_vectors, plan_deltas, read_tensors
from engine.errors import IncompatibleModelsError
from engine.io import ModelFolder
from engine.lora.finetune import AdapterFinetune, open_finetune
from engine.metric_cache import CacheKey, canonical_json, fingerprint_key

ANALYSIS_VERSION = "1"  # bump when a metric's definition or numerics change
ENGINE_VERSION = f"{engine.__version__}+analysis.{ANALYSIS_VERSION}"
FLUSH_EVERY_S = 10.0

Progress = Callable[[int, int, str], None]  # (done, total, tensor name)


class AnalysisParams(BaseModel):
    """Everything that changes a metric's value (and so its cache key)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    spectrum: SpectrumParams = Field(default_factory=SpectrumParams)
    pairs: PairParams = Field(default_factory=PairParams)


def _json_key(value: BaseModel | dict) -> str:
    data = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    return canonical_json(data)


def _file_print(folder: ModelFolder, fingerprints: dict[str, dict], name: str) -> dict:
    info = folder.info(name)
    return {"file": info.file.name, **fingerprints[info.file.name]}


def _sanitize(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _sanitize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_sanitize(v) for v in value]
    return value


def _open(stack: ExitStack, ref, base: ModelFolder | None = None):
    """``ref`` itself when it is already opened (its caller closes it), else opened here and
    closed with ``stack``: a model folder, or (given the opened ``base``) a LoRA adapter."""
    if isinstance(ref, (ModelFolder, AdapterFinetune)):
        return ref
    return stack.enter_context(open_finetune(ref, base) if base is not None else ModelFolder(ref))


def _make_key(fingerprint: str, tensor: str, metric: str, params: str) -> CacheKey:
    """A cache key (``engine.metric_cache``'s rule) for this engine version."""
    return CacheKey(fingerprint, tensor, metric, params, ENGINE_VERSION)


def analyze(
    base: str | Path | ModelFolder,
    finetuned: Sequence[str | Path | ModelFolder],
    params: AnalysisParams | None = None,
    *,
    cache=None,
    progress: Progress | None = None,
    device: torch.device | str | None = None,
    names: Sequence[str] | None = None,
    with_pairs: bool = True,
) -> dict:
    """Analyse every floating tensor's task vector(s); see the module docstring."""
    started = time.perf_counter()
    params = params or AnalysisParams()
    sp, pp = params.spectrum, params.pairs
    with ExitStack() as stack:
        base_f = _open(stack, base)
        fts = [_open(stack, f, base_f) for f in finetuned]
        plan = plan_deltas(base_f, fts, names)
        n = len(fts)
        pair_list = [(i, j) for i in range(n) for j in range(i + 1, n)] if with_pairs else []
        base_prints = base_f.file_fingerprints()
        ft_prints = [f.file_fingerprints() for f in fts]
        single_params = _json_key(sp)
        # pairs depend on the left singular vectors, i.e. on the spectrum parameters too
        pair_params = _json_key({"pairs": pp.model_dump(mode="json"), "spectrum": sp.model_dump(mode="json")})

        single_keys: dict[tuple[str, int], Any] = {}
        pair_keys: dict[tuple[str, int, int], Any] = {}
        for name in plan.names:
            bp = _file_print(base_f, base_prints, name)
            fps = [_file_print(ft, ft_prints[i], plan.source_name(i, name)) for i, ft in enumerate(fts)]
            for i in range(n):
                single_keys[(name, i)] = _make_key(fingerprint_key(bp, fps[i]), name, "delta", single_params)
            for i, j in pair_list:
                first, second = sorted([fps[i], fps[j]], key=lambda d: json.dumps(d, sort_keys=True))
                pair_keys[(name, i, j)] = _make_key(fingerprint_key(bp, first, second), name, "pair", pair_params)

        cached: dict = {}
        if cache is not None:
            cached = cache.get_many([*single_keys.values(), *pair_keys.values()])
        singles = {k: cached[key] for k, key in single_keys.items() if key in cached}
        pairs = {k: cached[key] for k, key in pair_keys.items() if key in cached}
        hits = len(singles) + len(pairs)
        todo = [name for name in plan.names
                if any((name, i) not in singles for i in range(n))
                or any((name, i, j) not in pairs for i, j in pair_list)]
        total = len(plan.names)
        done = total - len(todo)
        if progress is not None:
            progress(done, total, "(cached)" if done else "")

        pending_rows: list = []
        written = 0
        last_flush = time.monotonic()

        def flush() -> None:
            nonlocal pending_rows, written, last_flush
            if cache is not None and pending_rows:
                written += cache.put_many(pending_rows) or 0
            pending_rows = []
            last_flush = time.monotonic()

        rank = pp.subspace_rank if pair_list else 0
        for name, base32, deltas in iter_task_vectors(plan, todo, device=device):
            needs_left = {i for pair in pair_list if (name, *pair) not in pairs for i in pair}
            lefts: dict[int, torch.Tensor | None] = {}
            for i in range(n):
                if (name, i) not in singles:
                    metrics, left = tensor_metrics(deltas[i], base32, sp,
                                                   want_left=rank if i in needs_left else 0)
                    metrics = _sanitize(metrics)
                    singles[(name, i)] = metrics
                    pending_rows.append((single_keys[(name, i)], metrics))
                    lefts[i] = left
                elif i in needs_left:
                    matrix = as_matrix(finite_part(deltas[i])[0])
                    lefts[i] = (compute_spectrum(matrix, sp, want_left=rank).left
                                if matrix is not None else None)
            for i, j in pair_list:
                if (name, i, j) in pairs:
                    continue
                value = _sanitize(pair_metrics(deltas[i], deltas[j], pp,
                                               left_a=lefts.get(i), left_b=lefts.get(j)))
                pairs[(name, i, j)] = value
                pending_rows.append((pair_keys[(name, i, j)], value))
            del base32, deltas, lefts
            done += 1
            if progress is not None:
                progress(done, total, name)
            if time.monotonic() - last_flush > FLUSH_EVERY_S:
                flush()
        flush()

    labels = [str(f.path) for f in fts]
    tensors_out, pairs_out = [], []
    sq_norms = [0.0] * n
    dots: dict[tuple[int, int], float] = {pair: 0.0 for pair in pair_list}
    conflict: dict[tuple[int, int], list[float]] = {pair: [] for pair in pair_list}
    jacc: dict[tuple[int, int], list[float]] = {pair: [] for pair in pair_list}
    for name in plan.names:
        for i in range(n):
            m = singles[(name, i)]
            tensors_out.append({"name": name, "model": i, **m})
            sq_norms[i] += (m["fro_norm"] or 0.0) ** 2
        for i, j in pair_list:
            p = pairs[(name, i, j)]
            pairs_out.append({"name": name, "a": i, "b": j, **p})
            dots[(i, j)] += p["dot"] or 0.0
            if p["sign_conflict"] is not None:
                conflict[(i, j)].append(p["sign_conflict"])
            if p["topk_jaccard"] is not None:
                jacc[(i, j)].append(p["topk_jaccard"])
    matrix = cosine_matrix(sq_norms, dots)
    summaries = [{"a": i, "b": j, "cosine": matrix[i][j],
                  "mean_sign_conflict": (sum(conflict[(i, j)]) / len(conflict[(i, j)])) if conflict[(i, j)] else None,
                  "mean_topk_jaccard": (sum(jacc[(i, j)]) / len(jacc[(i, j)])) if jacc[(i, j)] else None}
                 for i, j in pair_list]
    cache_info = {"enabled": cache is not None and getattr(cache, "enabled", True),
                  "path": str(getattr(cache, "path", "")) or None,
                  "status": getattr(cache, "status", None) if cache is not None else "off",
                  "hits": hits, "misses": len(single_keys) + len(pair_keys) - hits,
                  "written": written}
    warnings = list(plan.warnings)
    if cache is not None:
        warnings.extend(getattr(cache, "warnings", []) or [])
    return _sanitize({
        "base": str(base_f.path),
        "finetuned": labels,
        "engine_version": ENGINE_VERSION,
        "params": params.model_dump(mode="json"),
        "tensors": tensors_out,
        "pairs": pairs_out,
        "models": {"finetuned": labels, "fro_norm": [math.sqrt(s) for s in sq_norms],
                   "cosine": matrix, "pairs": summaries},
        "cache": cache_info,
        "warnings": warnings,
        "seconds": time.perf_counter() - started,
    })


def analyze_clusters(
    base: str | Path | ModelFolder,
    finetuned: Sequence[str | Path | ModelFolder],
    params=None,
    *,
    cache=None,
    progress: Progress | None = None,
    device: torch.device | str | None = None,
    names: Sequence[str] | None = None,
    include_labels: bool = False,
) -> dict:
    """Channel clusters (``engine.analysis.clusters``) of every matrix's task vectors across the
    fine-tunes: ``{"layers": [{"name", **summary}], "cache": {...}}``, cached like ``analyze``
    (metric ``clusters``; the key covers the base file and every fine-tune's file, in order)."""
    from engine.analysis.clusters import ClusterParams, channel_clusters

    params = params or ClusterParams()
    with ExitStack() as stack:
        base_f = _open(stack, base)
        fts = [_open(stack, f, base_f) for f in finetuned]
        plan = plan_deltas(base_f, fts, names)
        matrices = [n for n in plan.names if len(base_f.info(n).shape) >= 2]
        base_prints = base_f.file_fingerprints()
        ft_prints = [f.file_fingerprints() for f in fts]
        key_params = _json_key({"clusters": params.model_dump(mode="json"), "labels": include_labels})
        keys = {}
        for name in matrices:
            files = [_file_print(base_f, base_prints, name)] + [
                _file_print(ft, ft_prints[i], plan.source_name(i, name)) for i, ft in enumerate(fts)]
            keys[name] = _make_key(fingerprint_key(*files), name, "clusters", key_params)
        cached = cache.get_many(list(keys.values())) if cache is not None else {}
        found = {name: cached[key] for name, key in keys.items() if key in cached}
        todo = [n for n in matrices if n not in found]
        done = len(matrices) - len(todo)
        rows = []
        for name, _, deltas in iter_task_vectors(plan, todo, device=device):
            summary = _sanitize(channel_clusters(deltas, params, name=name).summary(include_labels))
            found[name] = summary
            rows.append((keys[name], summary))
            done += 1
            if progress is not None:
                progress(done, len(matrices), name)
        written = cache.put_many(rows) if cache is not None and rows else 0
    return {"base": str(base_f.path), "finetuned": [str(f.path) for f in fts],
            "params": params.model_dump(mode="json"),
            "layers": [{"name": n, **found[n]} for n in matrices],
            "cache": {"hits": len(matrices) - len(todo), "misses": len(todo), "written": written}}


def tensor_spectrum(base: str | Path | ModelFolder, finetuned: str | Path | ModelFolder, name: str,
                    params: SpectrumParams | None = None, *, device: torch.device | str | None = None,
                    ) -> dict:
    """The whole singular spectrum of one tensor's task vector (for a click-through view):
    ``{"name", "shape", "method", "values": [...], "fro_norm", "cumulative_energy": [...]}``.
    ``values`` is complete for "exact"/"gram", the top q for "randomized"."""
    params = params or SpectrumParams()
    with ExitStack() as stack:
        base_f = _open(stack, base)
        ft_f = _open(stack, finetuned, base_f)
        plan = plan_deltas(base_f, [ft_f], [name])
        if not plan.names:
            raise IncompatibleModelsError("tensor is not floating point", path=base_f.path, tensor=name)
        _, deltas = read_tensors(plan, name, device)
    d, _, _ = finite_part(deltas[0])
    matrix = as_matrix(d)
    if matrix is None:
        return {"name": name, "shape": list(d.shape), "method": None, "values": None,
                "fro_norm": math.sqrt(float((d.double() ** 2).sum())), "cumulative_energy": None}
    spec = compute_spectrum(matrix, params)
    total = spec.total_energy
    cumulative = (torch.cumsum(spec.values ** 2, 0) / total).tolist() if total > 0 else [0.0] * spec.values.numel()
    return {"name": name, "shape": list(d.shape), "method": spec.method,
            "values": [float(v) for v in spec.values], "fro_norm": math.sqrt(total),
            "cumulative_energy": cumulative}
