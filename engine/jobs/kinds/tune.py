"""The ``tune`` job kind: merge tuning (a search over merge parameters)."""

from __future__ import annotations

from pydantic import model_validator

from engine.errors import ParameterError
from engine.jobs.kinds.base import JobKind, Progress, _Params, register_kind


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
