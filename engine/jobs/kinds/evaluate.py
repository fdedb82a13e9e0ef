"""The ``eval`` job kind: scoring a model folder on the zoo tasks."""

from __future__ import annotations

from engine.jobs.kinds.base import JobKind, Progress, _Params, register_kind


class EvalJobParams(_Params):
    model_dir: str
    tasks: list[str] | None = None
    n_per_task: int | None = None



def _eval(params: EvalJobParams, progress: Progress) -> dict:
    from engine.evaluate import evaluate_folder

    progress(0.0, f"evaluating {params.model_dir}")
    return evaluate_folder(params.model_dir, tasks=params.tasks, n_per_task=params.n_per_task)


register_kind(JobKind("eval", EvalJobParams, _eval, "score a model folder on the zoo tasks"))
