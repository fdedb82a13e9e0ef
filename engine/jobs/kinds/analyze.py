"""The ``analyze`` job kind: the full delta analysis; its metric rows come back for the app to ingest."""

from __future__ import annotations

from engine.errors import ParameterError
from engine.jobs.kinds.base import JobKind, Progress, _Params, register_kind
from engine.metric_cache import RecordingCache


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


register_kind(JobKind("analyze", AnalyzeJobParams, _analyze,
                      "full delta analysis; metric rows come back for the app to ingest"))
