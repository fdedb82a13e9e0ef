"""The ``merge`` job kind: a merge per a recipe, written to a folder (and optionally scored)."""

from __future__ import annotations

from pydantic import model_validator

from engine.jobs.kinds.base import JobKind, Progress, _Params, register_kind


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


register_kind(JobKind("merge", MergeJobParams, _merge, "merge models per a recipe, write a folder"))
