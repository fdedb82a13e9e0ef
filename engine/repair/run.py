"""``repair``: stream an aligned model and its fine-tune through one repair method.

Order of work (everything that can be refused is refused before the output is opened):

1. the method and its parameters; the folders (aligned, fine-tune, unaligned) opened by the
   strict reader; the fine-tune must have the aligned model's tensors, shapes and config (a
   mismatch names the tensor), and so must the unaligned model;
2. the calibration files (``--calibration`` for safety data, ``--task-data`` for IRR's task
   data), read by the project's calibration reader; the models whose activations are needed
   loaded, the safety examples checked against the aligned model, IRR's Fisher computed;
3. the output, through the staged atomic writer, laid out from the fine-tune's tensors:
   - tensors the method does not repair with statistics stream one at a time (aligned,
     fine-tuned and, where needed, unaligned tensor read, combined, written);
   - repaired linears go decoder layer by decoder layer (``engine.repair.layerwise``): the
     statistics of one layer at a time, from the model whose activations the method uses
     (Safe Delta: the aligned model on safety data; IRR: the fine-tune on its task data,
     true-sequential, with the Fisher of the aligned model computed first).
   A NaN/Inf found on the way (a tensor, a Hessian) aborts the write: nothing appears.
4. the manifest (method, parameters, per-matrix report, inputs' fingerprints, the data used)
   and a model card, in the same atomic write.

Memory: the model whose activations are needed is loaded once (fp32); the other models are
read tensor by tensor; IRR's Fisher is held for its target linears only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from engine.errors import ConfigError, IncompatibleModelsError, ParameterError
from engine.io import ModelFolder, ModelWriter
from engine.io.side_files import TOKENIZER_FILES, read_side_files
from engine.repair.registry import RepairLayout, TensorInputs, get_method
from engine.task_vectors import check_finite, read_model_tensor, task_vector32

Progress = Callable[[float, str], None]
SIDE_FILES = (*TOKENIZER_FILES, "generation_config.json")
REFUSED = "repair refused"
MAX_MANIFEST_BYTES = 1 << 24


@dataclass
class RepairResult:
    out: Path
    method: str
    params: dict
    report: dict[str, dict]
    summary: dict
    seconds: float
    warnings: list[str] = field(default_factory=list)


def _same_tensors(aligned: ModelFolder, other: ModelFolder, role: str) -> None:
    from engine.compat import require_compatible

    try:
        require_compatible(aligned, [other])
    except IncompatibleModelsError as err:
        reasons = err.reasons or [err.reason]
        tensor_reasons = [r for r in reasons if "tensor '" in r]
        first = (tensor_reasons or reasons)[0].split(": ", 1)[-1]
        raise IncompatibleModelsError(
            f"the {role} is not a model of the aligned model's shape: {len(reasons)} "
            f"mismatch(es), e.g. {first}", reasons=reasons, path=other.path) from None
    extra = [n for n in other.tensor_names if n not in aligned]
    if extra:
        raise IncompatibleModelsError(f"the {role} has a tensor the aligned model lacks "
                                      f"({len(extra)} in all); refused", path=other.path,
                                      tensor=extra[0])


def layout_of(config: dict, path=None) -> RepairLayout:
    """Linear weights by role, from the architecture built on the meta device."""
    from engine.evaluate.loading import model_from_config
    from engine.repair.layerwise import decoder_layers, linear_modules

    with torch.device("meta"):
        model = model_from_config(config, path=path)
    prefix, layers = decoder_layers(model)
    decoder = [n for i, layer in enumerate(layers) for n in linear_modules(layer, f"{prefix}.{i}")]
    inside = set(decoder)
    tied = bool(config.get("tie_word_embeddings", False))
    other = [f"{name}.weight" for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and f"{name}.weight" not in inside
             and not (tied and m.weight is model.get_input_embeddings().weight)]
    return RepairLayout(decoder_linears=decoder, other_linears=other)


def _matched_shares(path: str | None) -> dict[str, float]:
    if path is None:
        return {}
    from engine.textparse import parse_json

    file = Path(path)
    if not file.is_file():
        raise ConfigError("match_manifest: not a file", path=file)
    if file.stat().st_size > MAX_MANIFEST_BYTES:
        raise ConfigError(f"match_manifest: over {MAX_MANIFEST_BYTES} bytes", path=file)
    data = parse_json(file.read_bytes(), source=str(file))
    report = data.get("repair", {}).get("report") if isinstance(data, dict) else None
    if not isinstance(report, dict):
        raise ConfigError("match_manifest: not the manifest of a repair output", path=file)
    return {name: float(r["kept_share"]) for name, r in report.items()
            if isinstance(r, dict) and isinstance(r.get("kept_share"), (int, float))}


class _Reader:
    """Float32 tensors of the aligned, fine-tuned and (optional) unaligned models."""

    def __init__(self, aligned, finetuned, unaligned, device):
        self.a, self.f, self.u, self.device = aligned, finetuned, unaligned, device

    def inputs(self, name: str, *, target: bool, need_vector: bool) -> TensorInputs:
        a32 = read_model_tensor(self.a, name).to(device=self.device, dtype=torch.float32)
        check_finite(a32, self.a, name, REFUSED)
        if getattr(self.f, "is_adapter", False):  # a LoRA fine-tune: base + its factors
            f32 = a32 + task_vector32(a32, self.f, name)
        else:  # read as stored, so kept entries can equal it bit for bit
            f32 = read_model_tensor(self.f, name).to(device=self.device, dtype=torch.float32)
        check_finite(f32, self.f, name, REFUSED)
        vector = None
        if need_vector:
            vector = -task_vector32(a32, self.u, name)  # aligned - unaligned
            check_finite(vector, self.u, name, REFUSED)
        return TensorInputs(name=name, aligned=a32, finetuned=f32, target=target,
                            safety_vector=vector, path=str(self.f.path))


def repair(aligned: str | Path, finetuned: str | Path, out: str | Path, method: str,
           params: dict | None = None, *, unaligned: str | Path | None = None,
           calibration: str | Path | None = None, task_data: str | Path | None = None,
           device: str | torch.device | None = None, progress: Progress | None = None
           ) -> RepairResult:
    """Write the repaired fine-tune to ``out`` (see the module docstring)."""
    from engine.device import resolve_device
    from engine.evaluate.calibration_data import CalibrationData

    started = time.perf_counter()
    spec = get_method(method)
    opts = spec.parse_params(params)
    compute = resolve_device(device)
    say = progress or (lambda fraction, message: None)
    needs_vector = "safety_vector" in spec.stats
    if needs_vector and unaligned is None:
        raise ParameterError(
            f"{spec.name} needs a safety vector: give --unaligned U (v = aligned - unaligned, "
            "the paper), or the aligned model's own base as --unaligned with --param "
            "safety_vector=alignment_delta (ours, a labelled fallback)")
    safety_file = (CalibrationData.read(calibration, named_by="--calibration")
                   if calibration is not None else None)
    task_file = (CalibrationData.read(task_data, named_by="--task-data")
                 if task_data is not None else None)
    warnings: list[str] = []
    with ModelFolder(aligned) as a, ModelFolder(finetuned) as f:
        from engine.io.staging import check_destination

        inputs_given = [a.path, f.path] + ([Path(unaligned)] if needs_vector else [])
        check_destination(Path(out).absolute(), inputs_given)  # before any model is loaded
        _same_tensors(a, f, "fine-tune")
        u = ModelFolder(unaligned) if needs_vector else None
        scratch: list = []  # scratch folders of the statistics, removed at the end
        try:
            if u is not None:
                _same_tensors(a, u, "unaligned model")
            if "task_hessian" in spec.stats and task_file is None:  # refused before any write
                from engine.repair.statistics import task_examples

                task_examples(1, 0, task=opts.task, finetuned=f.path)
            layout = layout_of(f.config, f.path / "config.json")
            targets = spec.module.target_names(opts, layout)
            shares = _matched_shares(getattr(opts, "match_manifest", None))
            reader = _Reader(a, f, u, compute)
            names = f.tensor_names
            plan = [(n, f.info(n).dtype, tuple(f.info(n).shape)) for n in names]
            report: dict[str, dict] = {}
            data_notes: dict = {}
            card_params = opts.model_dump(mode="json")
            manifest = {"kind": "repair", "repair": {
                "method": spec.name, "paper": spec.paper, "params": card_params,
                "aligned": str(a.path), "finetuned": str(f.path),
                "unaligned": str(u.path) if u is not None else None,
                "safety_vector": (getattr(opts, "safety_vector", None) if needs_vector else None),
                "fingerprints": {"aligned": a.file_fingerprints(), "finetuned": f.file_fingerprints(),
                                 **({"unaligned": u.file_fingerprints()} if u is not None else {})},
                "report": report, "data": data_notes, "warnings": warnings}}
            from engine.export_card import CARD_NAME, model_card

            label = spec.name + (" (alignment-delta safety vector)"
                                 if getattr(opts, "safety_vector", None) == "alignment_delta" else "")
            card = model_card(base=a.path, inputs=[f.path] + ([u.path] if u is not None else []),
                              method=spec.name, parameters=card_params, tags=["safety-repair"],
                              body=f"The fine-tune repaired for safety by {label} ({spec.paper}) "
                                   "against its aligned model.")
            extra = {**read_side_files(f.path, SIDE_FILES), CARD_NAME: card.encode()}
            streamed = [n for n in names if n not in targets or spec.stats in ((), ("safety_vector",))]
            pending = [n for n in names if n not in streamed]
            prepared = None
            if pending:  # models loaded, data checked, Fisher computed: before any write
                from engine.repair.sweep import prepare, repair_layers

                prepared = prepare(spec, opts, reader, pending, say=say, data_notes=data_notes,
                                   warnings=warnings, safety_file=safety_file,
                                   task_file=task_file, device=compute, cleanup=scratch)
            with ModelWriter(out, config=f.config, extra_files=extra, manifest_extra=manifest,
                             input_folders=[a.path, f.path] + ([u.path] if u is not None else []),
                             plan=plan) as writer:
                def emit(name: str, inputs: TensorInputs) -> torch.Tensor:
                    result, info = spec.module.repair_tensor(inputs, opts)
                    stored = result.to(f.info(name).dtype).cpu()
                    check_finite(stored, f, name, REFUSED + " (the repaired value does not fit "
                                 "the fine-tune's dtype)")
                    writer.add_tensor(name, stored)
                    if info is not None:
                        report[name] = info
                    return result

                for i, name in enumerate(streamed):
                    say(0.5 * i / max(1, len(names)), name)
                    inputs = reader.inputs(name, target=name in targets, need_vector=needs_vector)
                    inputs.share = shares.get(name)
                    emit(name, inputs)
                if prepared is not None:
                    repair_layers(prepared, reader, pending, emit, say=say,
                                  need_vector=needs_vector)
        finally:
            from engine.repair.sweep import discard

            discard(scratch)
            if u is not None:
                u.close()
    summary = summarize(report, plan)
    return RepairResult(out=Path(out), method=spec.name, params=card_params, report=report,
                        summary=summary, seconds=time.perf_counter() - started, warnings=warnings)


def summarize(report: dict[str, dict], plan) -> dict:
    """Entry-weighted kept share over the repaired matrices, and their count."""
    sizes = {n: int(torch.Size(shape).numel()) for n, _, shape in plan}
    total = sum(sizes[n] for n in report)
    kept = sum(sizes[n] * r["kept_share"] for n, r in report.items() if "kept_share" in r)
    return {"matrices": len(report), "kept_share": kept / total if total else None}


__all__ = ["RepairResult", "layout_of", "repair", "summarize"]
