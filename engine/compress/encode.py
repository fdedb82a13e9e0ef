"""Compress a fine-tune against its base into an artifact (the rebuild is ``engine.compress.rebuild``).

``compress`` streams tensor by tensor: it reads one tensor of each model (through
``ModelFolder``), takes the delta in float32 on the compute device, stores 1-D deltas in fp16
and hands every matrix to the compressor with its byte budget, appending the section to the
artifact's payload file. Nothing model-sized is held, except by the compressors that learn
scalars on calibration prompts (BitDelta with ``distill``, DBMS), which need a forward pass;
their ``calibration_data`` file (the user's JSONL, dev split only) is read and checked before
anything is opened or written, and must lie in ``allowed_roots`` when those are given (the app).
A CUDA out-of-memory while encoding one matrix is retried on the CPU; the result's warnings
and the manifest (``cpu_fallback``) name those matrices.

Byte budget for ``--ratio R``: the whole folder may take ``2 N / R`` bytes (``N`` delta entries).
Fixed costs come first (manifest, safetensors header, section offsets, 1-D tensors, embedded
side files, the fp16 sections of matrices outside the compression ``scope``); the rest is split
over the compressed matrices in proportion to their sizes, and whatever a matrix leaves unused
(compressors with discrete settings rarely land exactly) carries over to the next one.
Compressors with ``allocate`` split the budget themselves after a first streaming pass of
statistics. With ``ratio_over: compressed`` the compressed matrices' sections get
``2 N_c / R`` bytes (``N_c`` their entries) and nothing else is budgeted (``engine.compress.scope``).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from pydantic import BaseModel

from engine.compat import require_compatible
from engine.compress.artifact import (FORMAT, FORMAT_VERSION, TENSORS_NAME, ArtifactWriter,
                                      base_fingerprint, compact_json, engine_version, folder_bytes,
                                      layout_of, now_utc, safetensors_header, side_files_digest)
from engine.compress.calibration import calibration_plan, learns
from engine.compress.codec import as_matrix_shape, decode_section, is_matrix, tensor_context
from engine.compress.registry import get_method
from engine.compress.scope import compressed_set_ratio, exact_section, in_scope, manifest_entry
from engine.device import resolve_device
from engine.errors import (ArtifactError, ConfigError, IncompatibleModelsError, ParameterError,
                           PathNotAllowedError)
from engine.io import ModelFolder
from engine.io.header import TORCH_TO_SAFETENSORS
from engine.io.side_files import SIDE_FILES, read_side_file
from engine.lora.finetune import AdapterFinetune, open_finetune
from engine.task_vectors import check_finite, read_stored, task_vector32

CALIBRATION_RESERVE = 48  # manifest bytes kept free for learned scalars
MANIFEST_SLACK = 24

Progress = Callable[[float, str], None]


@dataclass
class CompressResult:
    out: Path
    method: str
    params: dict
    target_ratio: float | None
    ratio: float
    bytes: int
    delta_entries: int
    seconds: float
    device: str
    warnings: list[str] = field(default_factory=list)
    tensors: dict[str, dict] = field(default_factory=dict)  # what the compressor chose, per matrix
    calibration: dict = field(default_factory=dict)
    scope: str = "all"
    compressed_entries: int = 0            # entries of the matrices given to the compressor
    ratio_compressed: float | None = None  # 2 x compressed_entries / bytes of their sections


def _delta(base: ModelFolder, ft: ModelFolder, name: str, device) -> torch.Tensor | None:
    """``ft - base`` of one tensor, float32 on ``device`` (``engine.task_vectors``' rules);
    NaN/Inf refused naming the folder that holds them (a NaN in the base is not the
    fine-tune's). None for an integer or bool tensor: it has no delta to compress, so it must
    equal the base's (rebuilt as its copy)."""
    base_t = read_stored(base, name)
    if not base_t.is_floating_point() or not ft.info(name).dtype.is_floating_point:
        ft_t = read_stored(ft, name)
        if base_t.dtype != ft_t.dtype or not torch.equal(base_t, ft_t):
            raise IncompatibleModelsError(
                f"this {ft_t.dtype} tensor differs from the base's {base_t.dtype} one: integer and "
                "bool tensors are rebuilt as the base's copy, never compressed", path=ft.path,
                tensor=name)
        return None
    base32 = base_t.to(device, torch.float32)
    check_finite(base32, base, name, "compression refused")
    delta = task_vector32(base32, ft, name)
    # NaN/Inf in the fine-tune, or finite inputs whose difference leaves float32's range
    check_finite(delta, ft, name, "compression refused")
    return delta


def _side_files(base: ModelFolder, ft: ModelFolder, mode: str) -> tuple[dict, dict[str, bytes]]:
    """The manifest entry and the files to store; with "dedup", files byte-identical to the
    base's copies are referenced (by one digest) instead of stored."""
    stored, referenced = {}, []
    for name in SIDE_FILES:
        # vetted as the weights are: inside the folder, a regular file, no remote code
        data = read_side_file(ft.path, name)
        if data is None and isinstance(ft, AdapterFinetune):  # an adapter is its base's model
            data = read_side_file(base.path, name)
        if data is None:
            continue
        same = mode == "dedup" and read_side_file(base.path, name) == data
        if same:
            referenced.append((name, data))
        else:
            stored[name] = data
    if not any(n == "config.json" for n in list(stored) + [n for n, _ in referenced]):
        raise ConfigError("the fine-tune has no config.json", path=ft.path)
    entry = {"stored": sorted(stored)}
    if referenced:
        entry["from_base"] = [n for n, _ in referenced]
        entry["from_base_sha256"] = side_files_digest(referenced)
    return entry, stored


def _open_pair(base_path, ft_path) -> tuple[ModelFolder, ModelFolder]:
    """The base and the fine-tune (a model folder, or a LoRA adapter read over the base)."""
    base = ModelFolder(base_path)
    try:
        ft = open_finetune(ft_path, base)
    except BaseException:
        base.close()
        raise
    require_compatible(base, [ft])
    extra = [n for n in ft.tensor_names if n not in base]
    missing = [n for n in base.tensor_names if n not in ft]
    if extra or missing:
        raise IncompatibleModelsError(
            f"the fine-tune's tensors must be the base's: {len(missing)} missing "
            f"({', '.join(missing[:3])}), {len(extra)} extra ({', '.join(extra[:3])})", path=ft.path)
    return base, ft


def _dtype_layout(ft: ModelFolder) -> dict:
    names = {n: TORCH_TO_SAFETENSORS[ft.info(n).dtype] for n in ft.tensor_names}
    common = Counter(names.values()).most_common(1)[0][0]
    out = {"dtype": common}
    overrides = {n: d for n, d in names.items() if d != common}
    if overrides:
        out["dtype_overrides"] = overrides
    return out


def compress(
    base_path: str | Path,
    finetuned_path: str | Path,
    out: str | Path,
    method: str,
    *,
    ratio: float | None = None,
    params: dict | BaseModel | None = None,
    device: torch.device | str | None = None,
    side_files: str = "dedup",
    progress: Progress | None = None,
    allowed_roots: Iterable[str | Path] | None = None,
) -> CompressResult:
    """Compress ``finetuned - base`` with ``method`` into the artifact folder ``out``.
    ``allowed_roots``: where a ``calibration_data`` file must lie (the app and its jobs)."""
    started = time.perf_counter()
    if side_files not in ("dedup", "embed"):
        raise ParameterError("side_files must be 'dedup' or 'embed'")
    spec = get_method(method)
    p = spec.parse_params(params, ratio)
    warnings: list[str] = []
    data = _calibration_data(p, allowed_roots, warnings)
    device = resolve_device(device)
    base, ft = _open_pair(base_path, finetuned_path)
    try:
        layout = layout_of(base)
        matrices = [(n, s) for n, s in layout if is_matrix(s)]
        vectors = [(n, s) for n, s in layout if not is_matrix(s)]
        n_entries = sum(int(np.prod(s)) for _, s in layout)
        n_vec = sum(int(np.prod(s)) for _, s in vectors)
        # section indices outside the scope (kept in fp16); float ones cost 2 bytes an entry
        kept = [i for i, (n, s) in enumerate(matrices) if not in_scope(n, s, p.scope)]
        floating = [base.info(n).dtype.is_floating_point for n, _ in matrices]
        n_compressed = sum(int(np.prod(s)) for i, (_, s) in enumerate(matrices)
                           if i not in kept and floating[i])
        kept_bytes = sum(2 * int(np.prod(matrices[i][1])) for i in kept if floating[i])
        side_entries, side_stored = _side_files(base, ft, side_files)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "engine_version": engine_version(),
            "created": now_utc(), "method": spec.name,
            "params": p.model_dump(mode="json", exclude_none=True),
            "target_ratio": ratio, "delta_entries": n_entries,
            "layout": {"tensors": len(layout), "matrices": len(matrices), "vector_entries": n_vec,
                       **_dtype_layout(ft)},
            "base": base_fingerprint(base),
            "side_files": side_entries,
            "scope": manifest_entry(kept, n_compressed),
        }
        plan = calibration_plan(spec, p, ft.path, data)
        if "warning" in plan:  # known before the budget: the manifest's bytes count it
            manifest["calibration_warning"] = plan["warning"]
            warnings.append(plan["warning"])
        writer = ArtifactWriter(out, input_folders=[base.path, ft.path])
        budgets = None
        if ratio is not None:
            budgets = _budgets(manifest, matrices, n_entries, ratio, n_vec, side_stored, spec, warnings,
                               kept=kept, kept_bytes=kept_bytes, n_compressed=n_compressed,
                               over=p.ratio_over)
        with writer:
            settings = _allocate(spec, p, base, ft, matrices, budgets, device, kept)
            carry = 0
            choices: dict[str, dict] = {}
            cpu_fallback: list[str] = []  # matrices encoded on the CPU after a CUDA out-of-memory
            for i, (name, shape) in enumerate(layout):
                delta = _delta(base, ft, name, device)
                if not is_matrix(shape):
                    try:
                        writer.add_vector(delta if delta is not None else torch.zeros(shape))
                    except ArtifactError as err:  # name the tensor and the fine-tune
                        raise ArtifactError(err.reason, path=ft.path, tensor=name) from None
                elif delta is None:  # integer/bool: an empty section, rebuilt as the base's copy
                    writer.add_section(b"")
                elif len(writer.offsets) - 1 in kept:  # outside the scope: the delta in fp16
                    try:
                        section = exact_section(delta)
                    except ValueError as err:
                        raise ArtifactError(str(err), path=ft.path, tensor=name) from None
                    writer.add_section(section)
                    choices[name] = {"bytes": len(section), "stored": "fp16 (outside the scope)"}
                else:
                    index = len(writer.offsets) - 1
                    budget = None
                    if budgets is not None:
                        budget = max(0, budgets[index] + carry)
                    section, ctx = _encode_matrix(spec, p, name, index, delta.reshape(as_matrix_shape(shape)),
                                                  budget, settings, device, cpu_fallback)
                    if budget is not None:
                        carry = budget - len(section)
                    writer.add_section(section)
                    choices[name] = {"bytes": len(section), **ctx.info}
                del delta
                if progress is not None:
                    progress((i + 1) / len(layout), name)
            calibration = _calibrate(spec, p, writer, base, ft, matrices, vectors, device, manifest,
                                     data, kept, plan)
            warnings.extend(calibration.get("warnings", []))
            ratio_compressed = compressed_set_ratio(writer.offsets, manifest)
            if cpu_fallback:
                manifest["cpu_fallback"] = list(cpu_fallback)
                warnings.extend(f"tensor {n!r}: CUDA out of memory; encoded on the CPU instead"
                                for n in cpu_fallback)
            writer.finalize(manifest, side_stored)
    finally:
        base.close()
        ft.close()
    total = folder_bytes(out)
    achieved = 2.0 * n_entries / total
    aimed = achieved if p.ratio_over == "artifact" else ratio_compressed
    if ratio is not None and (aimed is None or abs(aimed / ratio - 1) > 0.1):
        what = "ratio" if p.ratio_over == "artifact" else "ratio over the compressed set"
        warnings.append(f"achieved {what} {'n/a' if aimed is None else f'{aimed:.2f}'} is more "
                        f"than 10% from the target {ratio:g}")
    return CompressResult(out=Path(out), method=spec.name, params=manifest["params"], target_ratio=ratio,
                          ratio=achieved, bytes=total, delta_entries=n_entries,
                          seconds=time.perf_counter() - started, device=str(device),
                          warnings=warnings, tensors=choices, calibration=calibration,
                          scope=p.scope, compressed_entries=n_compressed,
                          ratio_compressed=ratio_compressed)


def _budgets(manifest, matrices, n_entries, ratio, n_vec, side_stored, spec, warnings, *,
             kept=(), kept_bytes=0, n_compressed=None, over="artifact") -> list[int | None]:
    """Per-matrix byte shares after the fixed costs (see the module docstring); None for a
    matrix outside the scope (stored in fp16, a fixed cost)."""
    counts = [0 if i in kept else int(np.prod(s)) for i, (_, s) in enumerate(matrices)]
    n_mat = max(1, sum(counts))
    if over == "compressed":  # the compressed matrices' sections alone: 2 N_c / R bytes
        available = int(2.0 * (n_compressed if n_compressed is not None else n_mat) / ratio)
        return [None if i in kept else int(available * c / n_mat) for i, c in enumerate(counts)]
    total = 2.0 * n_entries / ratio
    matrix_bytes = int(total)
    est_files = {TENSORS_NAME: {"sha256": "0" * 64, "size": 10 ** len(str(int(total)))}}
    for name, data in side_stored.items():
        est_files[f"files/{name}"] = {"sha256": "0" * 64, "size": len(data)}
    manifest_bytes = len(compact_json(dict(manifest, files=est_files))) + MANIFEST_SLACK
    if spec.calibrated:
        manifest_bytes += CALIBRATION_RESERVE
    odt_bytes = 4 if total < 2**31 else 8
    sizes = {"offsets": ("I32", len(matrices) + 1, odt_bytes * (len(matrices) + 1)),
             "vectors": ("F16", max(1, n_vec), 2 * n_vec),
             "payload": ("U8", max(1, matrix_bytes), max(1, matrix_bytes))}
    fixed = (manifest_bytes + len(safetensors_header(sizes)) + odt_bytes * (len(matrices) + 1)
             + 2 * n_vec + sum(len(d) for d in side_stored.values()) + kept_bytes)
    available = int(total) - fixed
    if available <= 0:
        outside = f", {kept_bytes} in fp16 outside the scope" if kept_bytes else ""
        warnings.append(f"ratio {ratio:g} is out of reach: the fixed costs ({fixed} bytes: manifest, "
                        f"1-D tensors, headers, side files{outside}) exceed the budget of "
                        f"{int(total)} bytes" + ("; ratio_over: compressed aims at the compressed "
                                                 "matrices alone" if kept_bytes else ""))
        available = 0
    return [None if i in kept else int(available * c / n_mat) for i, c in enumerate(counts)]


def _encode_matrix(spec, params, name: str, index: int, delta: torch.Tensor, budget, settings,
                   device, cpu_fallback: list[str]):
    """One matrix's section and its context; a CUDA out-of-memory is retried on the CPU with a
    fresh context (nothing of the failed attempt kept) and ``name`` appended to ``cpu_fallback``."""
    def attempt(on, matrix):
        ctx = tensor_context(spec, params, name, index, on)
        if settings is not None:
            ctx.setting = settings[index]
        return spec.module.encode(matrix, budget, params, ctx), ctx

    try:
        return attempt(device, delta)  # delta is on ``device`` already
    except torch.OutOfMemoryError:
        if torch.device(device).type != "cuda":
            raise
    if torch.cuda.is_available():  # outside the handler: the failed attempt is released first
        torch.cuda.empty_cache()
    cpu_fallback.append(name)
    return attempt(torch.device("cpu"), delta.cpu())


def _allocate(spec, params, base, ft, matrices, budgets, device, kept=()):
    """``{section index: setting}`` from the method's allocation over the compressed matrices."""
    module = spec.module
    if budgets is None or not hasattr(module, "allocate") or not module.needs_prepass(params):
        return None
    stats, indices = [], [i for i in range(len(matrices)) if i not in kept]
    for index in indices:
        name, shape = matrices[index]
        delta = _delta(base, ft, name, device)
        if delta is None:
            delta = torch.zeros(shape, device=device)
        stats.append(module.prepass(delta.reshape(as_matrix_shape(shape)), params,
                                    tensor_context(spec, params, name, index, device)))
    settings = module.allocate(stats, [budgets[i] for i in indices], params)
    return dict(zip(indices, settings))


def _calibration_data(params, allowed_roots, warnings: list[str]):
    """The method's ``calibration_data`` file, read and checked (dev split), or None."""
    ref = getattr(params, "calibration_data", None)
    if ref is None:
        return None
    from engine.evaluate.calibration_data import CalibrationData
    from engine.paths import resolve_user_path

    path = Path(ref)
    if allowed_roots is not None:
        try:
            path = resolve_user_path(ref, allowed_roots, kind="file")
        except PathNotAllowedError as err:
            raise PathNotAllowedError(f"calibration_data: {err.reason}", path=ref) from None
    data = CalibrationData.read(path, named_by="calibration_data")
    wanted = params.examples_wanted() if hasattr(params, "examples_wanted") else params.n_prompts
    note = data.shortfall(wanted) if wanted is not None else None
    if note is not None:
        warnings.append(note)
    return data


def _calibrate(spec, params, writer, base, ft, matrices, vectors, device, manifest, data=None,
               kept=(), plan=None) -> dict:
    """Run the method's ``calibrate`` hook. The job sees the compressed matrices only (its
    indices are theirs); the kept ones' fp16 deltas are fixed, with the 1-D ones, in
    ``job.vectors``."""
    module = spec.module
    if not learns(spec, params):
        return {}
    from engine.compress.calibration import CalibrationJob
    from engine.evaluate.loading import finetune_tokenizer

    base_sd = {n: read_stored(base, n).to(device, torch.float32) for n in base.tensor_names}
    teacher = {n: read_stored(ft, n).to(device, torch.float32) for n in ft.tensor_names}
    stored = torch.from_numpy(writer.read_vectors())
    vec, cursor = {}, 0
    for name, shape in vectors:
        count = int(np.prod(shape))
        vec[name] = stored[cursor:cursor + count].reshape(shape).to(device)
        cursor += count
    names = [n for n, _ in matrices]
    shapes = dict(matrices)
    for i in kept:
        vec[names[i]] = decode_section(spec, params, writer.read_section(i), names[i],
                                       shapes[names[i]], i, device)
    sections = [i for i in range(len(matrices)) if i not in kept]  # job index -> section index
    plan = plan if plan is not None else calibration_plan(spec, params, ft.path, data)
    tasks = plan.get("tasks", [])

    def decode(j: int) -> torch.Tensor:
        i = sections[j]
        return decode_section(spec, params, writer.read_section(i), names[i], shapes[names[i]], i, device)

    job = CalibrationJob(config=ft.config, tokenizer=finetune_tokenizer(ft),
                         device=device, matrices=[names[i] for i in sections], base=base_sd,
                         teacher=teacher, vectors=vec,
                         section=lambda j: writer.read_section(sections[j]), decode=decode,
                         tasks=list(tasks), data=data)
    outcome = module.calibrate(job, params) or {}
    if "patch" in outcome:
        position = {i: j for j, i in enumerate(sections)}
        patch = outcome["patch"]
        writer.rewrite_sections(lambda i, old: patch(position[i], old) if i in position else old)
    if "params" in outcome:
        manifest["params"].update(outcome["params"])
        for key, value in outcome["params"].items():
            setattr(params, key, value)
    used = dict(plan)  # data, text or tasks (and the fallback's warning)
    if data is not None:
        wanted = params.examples_wanted() if hasattr(params, "examples_wanted") else params.n_prompts
        used["examples"] = len(data) if wanted is None else min(wanted, len(data))
    return {**used, **outcome.get("report", {})}
