"""The objective of a tune: a plain recipe merged and scored in memory by a what-if session.

``ScorerSettings`` say what to load and score (picklable, so each worker process or Ray actor
builds its own ``TrialScorer`` from them and reads the models once). The score is the weighted
mean of the per-task accuracies (exact match) on the **dev** split: each zoo task's held-out
examples after the ones a report scores, and the dev half of each of the user's eval files
(``engine.merge.whatif``, ``split="dev"``). ``allow_heldout`` scores the held-out split
instead; the command line asks for it loudly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.errors import ParameterError


@dataclass(frozen=True)
class ScorerSettings:
    base_dir: str
    finetune_dirs: tuple[str, ...]
    tasks: tuple[str, ...] | None = None      # zoo tasks scored (None: none when eval files given)
    eval_files: tuple[str, ...] = ()
    n_per_task: int = 64
    weights: tuple[tuple[str, float], ...] = ()  # (task, weight); unnamed tasks weigh 1
    split: str = "dev"
    device: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> "ScorerSettings":
        data = dict(data)
        for key in ("finetune_dirs", "eval_files"):
            data[key] = tuple(data.get(key) or ())
        if data.get("tasks") is not None:
            data["tasks"] = tuple(data["tasks"])
        data["weights"] = tuple((str(k), float(v)) for k, v in data.get("weights") or ())
        return cls(**data)


def weighted_score(tasks: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """Σ w_t acc_t / Σ w_t over the scored tasks (a task without a weight weighs 1)."""
    if not tasks:
        raise ParameterError("no task was scored")
    total = sum(float(weights.get(name, 1.0)) for name in tasks)
    if total <= 0:
        raise ParameterError("the task weights sum to zero or less")
    return sum(float(weights.get(name, 1.0)) * acc for name, acc in tasks.items()) / total


def check_weights(weights: Mapping[str, float], tasks: Sequence[str]) -> None:
    unknown = sorted(set(weights) - set(tasks))
    if unknown:
        raise ParameterError(f"task weight for {unknown[0]!r}, which is not scored "
                             f"(scored: {', '.join(tasks)})")
    negative = [k for k, v in weights.items() if v < 0]
    if negative:
        raise ParameterError(f"task weight for {negative[0]!r} is negative")


@dataclass
class TrialScorer:
    """One what-if session (base + fine-tunes in RAM) scoring plain recipes."""

    settings: ScorerSettings
    session: object = field(init=False, repr=False)

    def __post_init__(self):
        from engine.merge.whatif import WhatIfSession

        s = self.settings
        tasks = list(s.tasks) if s.tasks is not None else []
        self.session = WhatIfSession(s.base_dir, list(s.finetune_dirs), tasks=tasks,
                                     n_per_task=s.n_per_task, n_generic=0, device=s.device,
                                     eval_files=list(s.eval_files), split=s.split)

    def score(self, recipe_data: Mapping, *, seed: int | None = None) -> dict:
        """Merge the plain recipe (a mapping) in memory and score it: ``{"score", "tasks":
        {name: accuracy}, "seconds"}``."""
        import warnings

        from engine.merge.spec import IgnoredParameterWarning, MergeSpec
        from engine.recipe import parse_recipe

        recipe = parse_recipe(dict(recipe_data), source="tune recipe")
        models = recipe.input_models()
        if len(models) != len(self.settings.finetune_dirs):
            raise ParameterError(f"the recipe has {len(models)} models; the session holds "
                                 f"{len(self.settings.finetune_dirs)}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", IgnoredParameterWarning)
            spec = MergeSpec.build(recipe.merge_method, recipe.parameter_scopes(),
                                   [m.parameters for m in models],
                                   num_layers=self.session.num_layers,
                                   seed=recipe.seed if seed is None else seed)
        result = self.session.evaluate_spec(spec)
        tasks = {name: float(v["accuracy"]) for name, v in result["tasks"].items()}
        weights = dict(self.settings.weights)
        return {"score": weighted_score(tasks, weights), "tasks": tasks,
                "seconds": sum(result["seconds"].values())}


def settings_for_recipe(recipe, *, recipe_dir: str | Path | None, objectives: Sequence[str] = ("zoo",),
                        n_per_task: int = 64, weights: Mapping[str, float] | None = None,
                        allow_heldout: bool = False, device: str | None = None) -> ScorerSettings:
    """Scorer settings for a plain ``MergeRecipe``: its base and models resolved as ``merge``
    resolves them; ``objectives``: ``zoo`` (the fine-tunes' own zoo tasks, every zoo task when
    a model has none) and/or JSONL/text eval files."""
    from engine.evaluate.tasks import TASK_NAMES
    from engine.merge.calibration import zoo_task_of
    from engine.recipe import resolve_model_ref

    if recipe.base_model is None:
        raise ParameterError("a tune needs the recipe's base_model (the what-if session merges "
                             "task vectors over it)")
    if not recipe.uniform_slice():
        raise ParameterError("a tune merges whole models: give 'models' or one slice over every "
                             "layer (a layer stack is not tuned)")
    base = resolve_model_ref(recipe.base_model, key="base_model", recipe_dir=recipe_dir)
    key = "models" if recipe.models is not None else "slices[0].sources"
    finetunes = [resolve_model_ref(m.model, key=f"{key}[{i}].model", recipe_dir=recipe_dir)
                 for i, m in enumerate(recipe.input_models())]
    tasks: list[str] | None = None
    files: list[str] = []
    for objective in objectives:
        if objective == "zoo":
            own = [zoo_task_of(f) for f in finetunes]
            zoo = list(dict.fromkeys(t for t in own if t)) if all(own) else list(TASK_NAMES)
            tasks = list(dict.fromkeys((tasks or []) + zoo))
        else:
            path = Path(objective)
            if not path.is_file():
                raise ParameterError(f"objective {objective!r}: not 'zoo' and not an eval file")
            files.append(str(path.resolve()))
    scored = list(tasks or []) + [Path(f).stem for f in files]
    weights = dict(weights or {})
    check_weights(weights, scored)
    return ScorerSettings(base_dir=str(base), finetune_dirs=tuple(str(f) for f in finetunes),
                          tasks=tuple(tasks) if tasks is not None else None,
                          eval_files=tuple(files), n_per_task=int(n_per_task),
                          weights=tuple(sorted(weights.items())),
                          split="heldout" if allow_heldout else "dev", device=device)


__all__ = ["ScorerSettings", "TrialScorer", "check_weights", "settings_for_recipe", "weighted_score"]
