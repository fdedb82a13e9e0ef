"""The kinds of job a worker can run: a name, a params class, and a function.

A kind's function takes its validated params and a ``progress(fraction, message)`` callback
and returns a JSON-serialisable result. Functions import the engine lazily, so the manager
(which only validates specs) stays light.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict

from engine.errors import ParameterError

Progress = Callable[[float, str], None]


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MergeJobParams(_Params):
    recipe_yaml: str  # a mergekit-format recipe (or one of ours)
    out: str  # destination folder (must not exist)
    recipe_dir: str | None = None  # where relative model paths in the recipe resolve


class EvalJobParams(_Params):
    model_dir: str
    tasks: list[str] | None = None
    n_per_task: int | None = None


class ZooBuildJobParams(_Params):
    out: str
    quick: bool = False
    seed: int = 0


def _merge(params: MergeJobParams, progress: Progress) -> dict:
    from engine.merge.executor import run_merge
    from engine.recipe import parse_recipe

    recipe = parse_recipe(params.recipe_yaml)
    result = run_merge(recipe, params.out, recipe_dir=params.recipe_dir, progress=progress)
    return {"out": str(result.out), "tensors": result.tensors,
            "seconds": round(result.seconds, 3), "device": result.device,
            "warnings": list(result.warnings)}


def _eval(params: EvalJobParams, progress: Progress) -> dict:
    from engine.evaluate import evaluate_folder

    progress(0.0, f"evaluating {params.model_dir}")
    return evaluate_folder(params.model_dir, tasks=params.tasks, n_per_task=params.n_per_task)


def _zoo_build(params: ZooBuildJobParams, progress: Progress) -> dict:
    from engine.zoo import build_zoo

    out = build_zoo(params.out, quick=params.quick, seed=params.seed, progress=progress)
    return {"out": str(out)}


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
