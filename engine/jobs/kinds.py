"""The kinds of job a worker can run: a name, a params class, and a function.

A kind's function takes its validated params and a ``progress(fraction, message)`` callback
and returns a JSON-serialisable result. Functions import the engine lazily, so the manager
(which only validates specs) stays light.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, model_validator

from engine.errors import ParameterError
from engine.metric_cache import RecordingCache

Progress = Callable[[float, str], None]


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MergeJobParams(_Params):
    recipe_yaml: str  # a mergekit-format recipe (or one of ours)
    out: str  # destination folder (must not exist)
    recipe_dir: str | None = None  # where relative model paths in the recipe resolve
    evaluate: bool = False  # score the output on the zoo tasks; the table goes into its card

    @model_validator(mode="after")
    def _check_recipe(self) -> "MergeJobParams":
        # Jobs are the app's: the recipe is parsed strictly and every model folder it names must
        # lie in the allowed roots, like a typed path, at submit (nothing queued) and again in
        # the worker (a spec.json edited on disk gets no further).
        from engine import settings
        from engine.recipe import check_recipe_paths, parse_recipe_text

        check_recipe_paths(parse_recipe_text(self.recipe_yaml), settings.allowed_roots(),
                           recipe_dir=self.recipe_dir)
        return self


class EvalJobParams(_Params):
    model_dir: str
    tasks: list[str] | None = None
    n_per_task: int | None = None


class ZooBuildJobParams(_Params):
    out: str
    quick: bool = False
    seed: int = 0
    resume: bool = False  # continue the unfinished build in ``out``


def _merge(params: MergeJobParams, progress: Progress) -> dict:
    from engine import settings
    from engine.merge.executor import run_merge
    from engine.recipe import parse_recipe_text

    recipe = parse_recipe_text(params.recipe_yaml)
    result = run_merge(recipe, params.out, recipe_dir=params.recipe_dir, progress=progress,
                       allowed_roots=settings.allowed_roots(), evaluate=params.evaluate)
    return {"out": str(result.out), "tensors": result.tensors,
            "seconds": round(result.seconds, 3), "device": result.device,
            "warnings": list(result.warnings),
            **({"evaluation": result.evaluation} if result.evaluation is not None else {})}


def _eval(params: EvalJobParams, progress: Progress) -> dict:
    from engine.evaluate import evaluate_folder

    progress(0.0, f"evaluating {params.model_dir}")
    return evaluate_folder(params.model_dir, tasks=params.tasks, n_per_task=params.n_per_task)


def _zoo_build(params: ZooBuildJobParams, progress: Progress) -> dict:
    from engine.zoo import build_zoo

    out = build_zoo(params.out, quick=params.quick, seed=params.seed, progress=progress,
                    resume=params.resume)
    return {"out": str(out)}



class AnalyzeJobParams(_Params):
    """A full delta analysis of a base and fine-tunes (spectra and pairs, channel clusters)
    and/or the neural-incompatibility maps of two models; the pages' job for big models."""

    base: str | None = None
    finetuned: list[str] = []
    analysis: dict | None = None  # engine.analysis.AnalysisParams as JSON; None: skip
    clusters: dict | None = None  # engine.analysis.ClusterParams as JSON; None: skip
    incompatibility: dict | None = None  # {"model_a", "model_b", "base_a"?, "base_b"?, "params"?}


def _analyze(params: AnalyzeJobParams, progress: Progress) -> dict:
    from engine.analysis import AnalysisParams, ClusterParams, analyze, analyze_clusters
    from engine.analysis.incompatibility import IncompatibilityParams, incompatibility_maps
    from engine.device import compute_device

    parts = [name for name, value in (("analysis", params.analysis), ("clusters", params.clusters),
                                      ("incompatibility", params.incompatibility)) if value is not None]
    if not parts:
        raise ParameterError("an analysis job needs at least one of analysis, clusters, incompatibility")
    if ("analysis" in parts or "clusters" in parts) and (not params.base or not params.finetuned):
        raise ParameterError("the delta analysis needs a base and at least one fine-tune")
    device = compute_device()
    recorder = RecordingCache()
    summary: dict = {}

    def stage(index: int, label: str):
        def report(done: int, total: int, name: str) -> None:
            fraction = (index + (done / total if total else 1.0)) / len(parts)
            progress(fraction, f"{label}: {done}/{total} {name}".strip())
        return report

    for index, part in enumerate(parts):
        progress(index / len(parts), f"{part}...")
        if part == "analysis":
            result = analyze(params.base, params.finetuned, AnalysisParams.model_validate(params.analysis),
                             cache=recorder, progress=stage(index, "delta metrics"), device=device)
            summary["analysis"] = {"tensors": len(result["tensors"]), "pairs": len(result["pairs"]),
                                   "seconds": round(result["seconds"], 3), "warnings": result["warnings"]}
        elif part == "clusters":
            result = analyze_clusters(params.base, params.finetuned,
                                      ClusterParams.model_validate(params.clusters), cache=recorder,
                                      progress=stage(index, "channel clusters"), device=device)
            summary["clusters"] = {"layers": len(result["layers"])}
        else:
            spec = dict(params.incompatibility)
            unknown = set(spec) - {"model_a", "model_b", "base_a", "base_b", "params"}
            if unknown or not spec.get("model_a") or not spec.get("model_b"):
                raise ParameterError("incompatibility needs model_a and model_b "
                                     "(optional: base_a, base_b, params)")
            incompatibility_maps(spec["model_a"], spec["model_b"],
                                 IncompatibilityParams.model_validate(spec.get("params") or {}),
                                 base_a=spec.get("base_a"), base_b=spec.get("base_b"), cache=recorder)
            summary["incompatibility"] = {"model_a": spec["model_a"], "model_b": spec["model_b"]}
    progress(1.0, f"{len(recorder.rows)} metric rows ready to ingest")
    return {"kind": "analyze", "device": str(device), "summary": summary, "rows": recorder.rows}

@dataclass(frozen=True)
class JobKind:
    name: str
    params_class: type[BaseModel]
    run: Callable[[Any, Progress], dict]
    description: str
    may_use_gpu: bool = True


JOB_KINDS: dict[str, JobKind] = {}


def register_kind(kind: JobKind) -> None:
    JOB_KINDS[kind.name] = kind


def get_kind(name: str) -> JobKind:
    try:
        return JOB_KINDS[name]
    except KeyError:
        known = ", ".join(sorted(JOB_KINDS))
        raise ParameterError(f"unknown job kind {name!r} (known: {known})") from None


register_kind(JobKind("merge", MergeJobParams, _merge, "merge models per a recipe, write a folder"))
register_kind(JobKind("eval", EvalJobParams, _eval, "score a model folder on the zoo tasks"))
register_kind(JobKind("zoo_build", ZooBuildJobParams, _zoo_build, "train the demo zoo",
                      may_use_gpu=False))
register_kind(JobKind("analyze", AnalyzeJobParams, _analyze,
                      "full delta analysis; metric rows come back for the app to ingest"))


class CompressJobParams(_Params):
    base: str
    finetuned: str
    method: str
    out: str
    ratio: float | None = None
    params: dict = {}


class DecompressJobParams(_Params):
    artifact: str
    base: str
    out: str


def _compress(params: CompressJobParams, progress: Progress) -> dict:
    from engine import settings
    from engine.compress import compress

    result = compress(params.base, params.finetuned, params.out, params.method,
                      ratio=params.ratio, params=params.params or None, progress=progress,
                      allowed_roots=settings.allowed_roots())
    return {"out": str(result.out), "method": result.method, "ratio": result.ratio,
            "scope": result.scope, "ratio_compressed": result.ratio_compressed,
            "bytes": result.bytes, "delta_entries": result.delta_entries,
            "seconds": round(result.seconds, 3), "warnings": list(result.warnings)}


def _decompress(params: DecompressJobParams, progress: Progress) -> dict:
    from engine.compress import decompress

    result = decompress(params.artifact, params.base, params.out, progress=progress)
    return {"out": str(result.out), "method": result.method, "tensors": result.tensors,
            "seconds": round(result.seconds, 3)}


register_kind(JobKind("compress", CompressJobParams, _compress,
                      "compress a fine-tune's delta into an artifact"))
register_kind(JobKind("decompress", DecompressJobParams, _decompress,
                      "rebuild a fine-tune from an artifact and its base"))


class ExtractLoraJobParams(_Params):
    """A PEFT LoRA adapter extracted from a fine-tune (``engine.lora.extract``)."""

    base: str
    finetuned: str
    out: str
    options: dict = {}  # engine.lora.extract.ExtractOptions as JSON

    @model_validator(mode="after")
    def _check(self) -> "ExtractLoraJobParams":
        # both folders under the allowed roots and the options valid, at submit (nothing queued)
        # and again in the worker
        from engine import settings
        from engine.lora.extract import ExtractOptions
        from engine.paths import resolve_user_path

        for path in (self.base, self.finetuned):
            resolve_user_path(path, settings.allowed_roots(), kind="dir")
        ExtractOptions.model_validate(self.options)
        return self


def _extract_lora(params: ExtractLoraJobParams, progress: Progress) -> dict:
    from engine.lora.extract import ExtractOptions, extract_lora

    result = extract_lora(params.base, params.finetuned, params.out,
                          ExtractOptions.model_validate(params.options), progress=progress)
    return {"out": str(result.out), "modules": result.modules,
            "ranks": sorted(set(result.ranks.values())), "kept_energy": round(result.kept_energy, 6),
            "seconds": round(result.seconds, 3), "warnings": list(result.warnings)}


register_kind(JobKind("extract_lora", ExtractLoraJobParams, _extract_lora,
                      "extract a PEFT LoRA adapter from a fine-tune"))


class RepairJobParams(_Params):
    """A safety repair (``engine.repair.run.repair``): every path under the allowed roots."""

    aligned: str
    finetuned: str
    method: str
    out: str
    unaligned: str | None = None
    calibration: str | None = None  # safety data (JSONL)
    task_data: str | None = None    # irr: task data (JSONL)
    params: dict = {}

    @model_validator(mode="after")
    def _check(self) -> "RepairJobParams":
        # at submit (nothing queued) and again in the worker
        from engine import settings
        from engine.paths import resolve_user_path
        from engine.repair.registry import get_method

        roots = settings.allowed_roots()
        for path in (self.aligned, self.finetuned, self.unaligned):
            if path is not None:
                resolve_user_path(path, roots, kind="dir")
        for path in (self.calibration, self.task_data, (self.params or {}).get("match_manifest")):
            if path is not None:
                resolve_user_path(path, roots, kind="file")
        get_method(self.method).parse_params(self.params)
        return self


def _repair(params: RepairJobParams, progress: Progress) -> dict:
    from engine.repair.run import repair

    result = repair(params.aligned, params.finetuned, params.out, params.method,
                    params.params or None, unaligned=params.unaligned,
                    calibration=params.calibration, task_data=params.task_data,
                    progress=progress)
    return {"out": str(result.out), "method": result.method, "params": result.params,
            "summary": result.summary, "report": result.report,
            "seconds": round(result.seconds, 3), "warnings": list(result.warnings)}


register_kind(JobKind("repair", RepairJobParams, _repair,
                      "repair a fine-tune's safety against its aligned model"))


class MoEJobParams(_Params):
    """A mixture of experts assembled per a mergekit-moe config (``engine.moe``)."""

    config_yaml: str  # mergekit-moe's config format
    out: str  # destination folder (must not exist)
    config_dir: str | None = None  # where relative model paths in the config resolve

    @model_validator(mode="after")
    def _check_config(self) -> "MoEJobParams":
        # parsed strictly and checked (gate mode, experts per token, prompts), and every model
        # folder it names inside the allowed roots, at submit (nothing queued) and in the worker
        from engine import settings
        from engine.moe import parse_moe_text
        from engine.recipe import resolve_model_ref

        config = parse_moe_text(self.config_yaml)
        roots = settings.allowed_roots()
        for key, ref in config.model_refs():
            resolve_model_ref(ref, key=key, recipe_dir=self.config_dir, allowed_roots=roots)
        return self


def _moe(params: MoEJobParams, progress: Progress) -> dict:
    from engine import settings
    from engine.moe import parse_moe_text, run_moe

    config = parse_moe_text(params.config_yaml)
    result = run_moe(config, params.out, config_dir=params.config_dir, progress=progress,
                     allowed_roots=settings.allowed_roots())
    return {"out": str(result.out), "tensors": result.tensors, "architecture": result.architecture,
            "experts": len(config.experts), "gate_mode": config.gate_mode,
            "seconds": round(result.seconds, 3), "device": result.device,
            "warnings": list(result.warnings)}


register_kind(JobKind("moe", MoEJobParams, _moe,
                      "assemble a mixture of experts from fine-tunes (mergekit-moe's config)"))


class TransferJobParams(_Params):
    """A cross-scale transfer (``engine.transfer.run.transfer``): every path under the allowed roots."""

    method: str
    source: str
    source_base: str
    target: str
    task: str
    out: str
    data: str | None = None  # own examples (JSONL)
    seed: int | None = None
    params: dict = {}
    n_eval: int = 128
    baselines: bool = True

    @model_validator(mode="after")
    def _check(self) -> "TransferJobParams":
        # at submit (nothing queued) and again in the worker
        from engine import settings
        from engine.evaluate.tasks import MAIN_TASKS
        from engine.paths import resolve_user_path
        from engine.transfer.run import parse_params

        roots = settings.allowed_roots()
        for path in (self.source, self.source_base, self.target):
            resolve_user_path(path, roots, kind="dir")
        if self.data is not None:
            resolve_user_path(self.data, roots, kind="file")
        parse_params(self.method, self.params)
        if self.task not in MAIN_TASKS:
            raise ParameterError(f"unknown task {self.task!r}; known: {', '.join(MAIN_TASKS)}")
        return self


def _transfer(params: TransferJobParams, progress: Progress) -> dict:
    from engine.transfer.run import transfer

    result = transfer(params.source, params.source_base, params.target, params.out, params.method,
                      params.task, params.params or None, data=params.data, seed=params.seed,
                      n_eval=params.n_eval, baselines=params.baselines, progress=progress)
    return {"out": str(result.out), "method": result.method, "task": result.task,
            "params": result.params, "accuracy": result.accuracy, "curve": result.curve,
            "seconds": round(result.seconds, 3), "warnings": list(result.warnings)}


register_kind(JobKind("transfer", TransferJobParams, _transfer,
                      "transfer a larger fine-tune's knowledge into a smaller base (PostPKT, LaTen)"))


class TuneJobParams(_Params):
    """A tune (``engine.tune``): the ranged recipe, the budget and the sampler; the best recipe
    goes to ``out`` (with the trials table and a per-trial history beside it)."""

    recipe_yaml: str  # a tune recipe: a mergekit recipe with {range: [lo, hi]} values
    out: str  # the best recipe's YAML file
    recipe_dir: str | None = None
    trials: int = 20
    sampler: str = "cmaes"
    seed: int = 0
    n_per_task: int = 64
    workers: int = 0

    @model_validator(mode="after")
    def _check_recipe(self) -> "TuneJobParams":
        # the space parsed (bad ranges refused) and every model folder inside the allowed
        # roots, at submit (nothing queued) and in the worker
        from engine import settings
        from engine.recipe import check_recipe_paths, parse_recipe
        from engine.textparse import parse_yaml
        from engine.tune.space import parse_space
        from engine.tune.study import SAMPLERS

        if self.sampler not in SAMPLERS:
            raise ParameterError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.trials < 1 or self.workers < 0:
            raise ParameterError("a tune needs trials >= 1 and workers >= 0")
        space = parse_space(parse_yaml(self.recipe_yaml, source="tune recipe"))
        check_recipe_paths(parse_recipe(space.decode(space.midpoint())), settings.allowed_roots(),
                           recipe_dir=self.recipe_dir)
        return self


def _tune(params: TuneJobParams, progress: Progress) -> dict:
    import tempfile
    from pathlib import Path

    from engine.jobs.spec import write_json_atomic
    from engine.tune.run import tune

    out = Path(params.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    history_path = out.with_suffix(".history.json")
    history: list[dict] = []

    def on_trial(p: dict) -> None:  # best-so-far per trial, for the live chart
        history.append({"trial": p["trial"], "score": p.get("score"), "best": p.get("best"),
                        "error": p.get("error")})
        write_json_atomic(history_path, history)
        best = f"{p['best']:.4f}" if p.get("best") is not None else "-"
        progress(p["finished"] / p["trials"], f"trial {p['finished']}/{p['trials']}: best {best}")

    with tempfile.TemporaryDirectory() as scratch:
        recipe_file = Path(scratch) / "tune.yml"
        recipe_file.write_text(params.recipe_yaml)
        outcome = tune(recipe_file, trials=params.trials, out=out, sampler=params.sampler,
                       seed=params.seed, n_per_task=params.n_per_task, workers=params.workers,
                       recipe_dir=params.recipe_dir or scratch, progress=on_trial)
    return {"best_trial": outcome.best_number, "best_score": outcome.best_score,
            "best_tasks": outcome.best_tasks, "best_recipe_yaml": out.read_text(),
            "study": outcome.study_name, "history": history, "ran": outcome.ran,
            "failed": outcome.failed, "outputs": [str(p) for p in outcome.outputs]}


register_kind(JobKind("tune", TuneJobParams, _tune,
                      "tune a recipe's ranged parameters on the dev split (Optuna study)"))


class VisionFuseJobParams(_Params):
    """A VisionFuse fusion (``engine.visionfuse.fuse``): every path under the allowed roots."""

    base: str
    models: list[str]
    out: str
    method: str = "task_arithmetic"
    params: dict = {}
    weights: list[float] | None = None

    @model_validator(mode="after")
    def _check(self) -> "VisionFuseJobParams":
        from engine import settings
        from engine.merge.registry import get_method
        from engine.paths import resolve_user_path

        roots = settings.allowed_roots()
        for path in (self.base, *self.models):
            resolve_user_path(path, roots, kind="dir")
        if len(self.models) < 2:
            raise ParameterError("VisionFuse fuses at least two members")
        if self.weights is not None and len(self.weights) != len(self.models):
            raise ParameterError(f"{len(self.weights)} weights for {len(self.models)} members")
        get_method(self.method).parse_params(self.params)
        return self


def _visionfuse(params: VisionFuseJobParams, progress: Progress) -> dict:
    from engine.visionfuse import fuse

    progress(0.0, "fusing")
    summary = fuse(params.base, params.models, params.out, params.method,
                   params.params or None, params.weights)
    progress(1.0, "fused")
    return summary


register_kind(JobKind("visionfuse", VisionFuseJobParams, _visionfuse,
                      "fuse multimodal members of one LM family (VisionFuse)"))
