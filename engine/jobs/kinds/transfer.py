"""The ``transfer`` job kind: cross-scale transfer of a fine-tune's knowledge."""

from __future__ import annotations

from pydantic import model_validator

from engine.errors import ParameterError
from engine.jobs.kinds.base import JobKind, Progress, _Params, register_kind


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
