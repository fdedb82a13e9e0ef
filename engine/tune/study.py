"""The Optuna study of a tune: samplers, resumable storage, the ask-and-tell loop, outputs.

The study lives in a journal file under the workbench home (``<home>/tune/<name>.journal``,
Optuna's ``JournalStorage`` with a file backend), so a stopped tune resumes: the same command
again finds the study by name and runs only the trials still missing from ``--trials N`` (the
budget is the total; trial numbers continue). A trial left running by a killed tune is marked
failed on resume.

Trials are asked in batches of one per worker, scored in parallel, and told back in trial
order, so the sequence of suggestions depends only on the sampler's seed, the batch size and
the scores, never on which worker finished first: the local pool and a Ray pool of the same
size give the same trials. A trial whose scoring fails (a worker died, the merge refused) is
told as failed with its one-line reason and the study continues.

Single objective: maximise the weighted mean dev accuracy. ``multi_objective``: one objective
per task, maximised together; the Pareto front is Optuna's ``best_trials`` and the recipe
written is the front's trial with the highest weighted mean.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.errors import ParameterError
from engine.tune.space import TuneSpace

SAMPLERS = ("cmaes", "tpe", "random")
# CMA-ES: Optuna's CmaEsSampler works in the intervals scaled to [0, 1], starting at their
# centre with sigma0 = 1/6 (the same sigma0 as mergekit-evolve; its x0 is 1/M for weights and 1
# otherwise, ours the centre of the user's intervals).


def make_sampler(name: str, seed: int, *, multi_objective: bool = False):
    import optuna

    if name == "cmaes":
        if multi_objective:
            raise ParameterError("the cmaes sampler optimises one objective; use tpe or random "
                                 "with --multi-objective")
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ParameterError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


def tune_dir() -> Path:
    from engine.settings import workbench_home

    return workbench_home() / "tune"


def study_name(space: TuneSpace, settings, sampler: str, seed: int, multi_objective: bool) -> str:
    """A stable name for the study of this space, objective, sampler and seed."""
    blob = json.dumps({"raw": space.raw, "dims": [d.name for d in space.dimensions],
                       "settings": settings.to_dict(), "sampler": sampler, "seed": seed,
                       "multi": multi_objective}, sort_keys=True, default=str)
    return "tune-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def open_study(name: str, *, sampler: str, seed: int, directions: Sequence[str],
               storage_path: Path | None = None):
    """Create or load the named study in its journal file; mark stale running trials failed."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    path = Path(storage_path) if storage_path is not None else tune_dir() / f"{name}.journal"
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(path)))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True,
                                sampler=make_sampler(sampler, seed,
                                                     multi_objective=len(directions) > 1),
                                directions=list(directions))
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_user_attr(trial._trial_id, "error", "left running by a stopped tune")
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    return study, path


@dataclass
class TuneResult:
    study: object
    storage_path: Path
    best_number: int | None
    best_score: float | None
    best_recipe: dict | None
    ran: int
    failed: int


def finished_count(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)))


def run_tune(space: TuneSpace, score_batch: Callable[[list[dict]], list[dict]], study, *,
             trials: int, batch_size: int, tasks_order: Sequence[str] | None = None,
             weights: dict | None = None, multi_objective: bool = False,
             progress: Callable[[dict], None] | None = None) -> TuneResult:
    """Run trials until the study holds ``trials`` finished ones. ``score_batch(recipes)``
    returns, per recipe, the scorer's result or ``{"error": "..."}``."""
    from optuna.trial import TrialState

    if trials < 1:
        raise ParameterError("--trials must be at least 1")
    if batch_size < 1:
        raise ParameterError("the batch size must be at least 1")
    ran = failed = 0
    while True:
        todo = trials - finished_count(study)
        if todo <= 0:
            break
        batch = [study.ask() for _ in range(min(batch_size, todo))]
        values = [{d.name: t.suggest_float(d.name, d.lo, d.hi, log=d.log) for d in space.dimensions}
                  for t in batch]
        recipes = [space.decode(v) for v in values]
        results = score_batch(recipes)
        for trial, result in zip(batch, results):  # told in trial order: deterministic
            ran += 1
            if "error" in result:
                failed += 1
                trial.set_user_attr("error", str(result["error"])[:500])
                study.tell(trial, state=TrialState.FAIL)
            else:
                trial.set_user_attr("tasks", result["tasks"])
                trial.set_user_attr("score", result["score"])
                trial.set_user_attr("seconds", result.get("seconds"))
                if multi_objective:
                    study.tell(trial, [result["tasks"][name] for name in tasks_order])
                else:
                    study.tell(trial, result["score"])
            if progress is not None:
                best = best_trial(study, multi_objective, weights)
                progress({"trial": trial.number, "score": result.get("score"),
                          "error": result.get("error"),
                          "best": best.user_attrs.get("score") if best is not None else None,
                          "finished": finished_count(study), "trials": trials})
    best = best_trial(study, multi_objective, weights)
    return TuneResult(study=study, storage_path=None, best_number=best.number if best else None,
                      best_score=best.user_attrs.get("score") if best else None,
                      best_recipe=space.decode(best.params) if best else None, ran=ran,
                      failed=failed)


def best_trial(study, multi_objective: bool, weights: dict | None = None):
    """The best complete trial: the highest score; with several objectives, the Pareto-front
    trial with the highest weighted mean (ties: the earliest)."""
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        return None
    pool = study.best_trials if multi_objective else done
    return max(pool, key=lambda t: (t.user_attrs.get("score", -math.inf), -t.number))


def trials_table(study, space: TuneSpace) -> list[dict]:
    """One row per trial: number, state, score, per-task accuracies, parameters, error."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        row = {"number": t.number, "state": t.state.name, "score": t.user_attrs.get("score")}
        for name, acc in (t.user_attrs.get("tasks") or {}).items():
            row[f"task:{name}"] = acc
        for d in space.dimensions:
            row[d.name] = t.params.get(d.name)
        row["seconds"] = t.user_attrs.get("seconds")
        row["error"] = t.user_attrs.get("error")
        rows.append(row)
    return rows


def pareto_numbers(study) -> list[int]:
    return sorted(t.number for t in study.best_trials)


__all__ = ["SAMPLERS", "TuneResult", "best_trial", "finished_count", "make_sampler", "open_study",
           "pareto_numbers", "run_tune", "study_name", "trials_table", "tune_dir"]
