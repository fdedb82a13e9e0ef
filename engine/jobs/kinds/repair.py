"""The ``repair`` job kind: safety repair of a fine-tune."""

from __future__ import annotations

from pydantic import model_validator

from engine.jobs.kinds.base import JobKind, Progress, _Params, register_kind


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
