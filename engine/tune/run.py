"""One tune, end to end: read the tune recipe, open (or resume) its study, run the trials on a
pool, and write the outputs atomically: the best recipe as a plain mergekit YAML, the trials
table (CSV, and Parquet when pyarrow is installed), the Pareto front with several objectives,
and the best merged model on request (the normal streaming merge, ``run_merge``)."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


from engine.errors import ParameterError
from engine.io.staging import write_file_atomic
from engine.textparse import MAX_TEXT_BYTES, parse_yaml


def write_text_atomic(path: Path, text: str | bytes) -> None:
    """The file holds the old content or the new, never half (``engine.io.staging``)."""
    write_file_atomic(path, text)


def read_tune_recipe(path: str | Path, *, require_ranges: bool = True):
    """(TuneSpace, the plain recipe at the space's midpoint, parsed) of a tune recipe file."""
    from engine.errors import ConfigError
    from engine.recipe import parse_recipe
    from engine.tune.space import parse_space

    path = Path(path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_TEXT_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"cannot read tune recipe: {err.strerror or err}", path=path) from None
    space = parse_space(parse_yaml(raw, source=str(path)), source=str(path), require=require_ranges)
    return space, parse_recipe(space.decode(space.midpoint()), source=str(path))


def plain_yaml(recipe_data: Mapping) -> str:
    from engine.recipe import parse_recipe

    return parse_recipe(dict(recipe_data)).to_yaml()


def table_csv(rows: Sequence[dict]) -> str:
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return buf.getvalue()


def write_table(rows: Sequence[dict], path: Path) -> list[Path]:
    """``path`` (.csv) and, when pyarrow is installed, the same table as .parquet beside it."""
    written = [Path(path)]
    write_text_atomic(path, table_csv(rows))
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return written
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    table = pa.table({c: [row.get(c) for row in rows] for c in columns})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    parquet = Path(path).with_suffix(".parquet")
    write_text_atomic(parquet, sink.getvalue().to_pybytes())
    written.append(parquet)
    return written


@dataclass
class TuneOutcome:
    best_number: int | None
    best_score: float | None
    best_tasks: dict
    best_recipe: dict | None
    study_name: str
    storage: Path
    trials: int
    ran: int
    failed: int
    outputs: list[Path] = field(default_factory=list)
    pareto: list[int] = field(default_factory=list)
    merged: Path | None = None


def tune(recipe_path: str | Path, *, trials: int, out: str | Path | None = None,
         sampler: str = "cmaes", objectives: Sequence[str] = ("zoo",), workers: int = 0,
         ray_address: str | None = None, seed: int = 0, n_per_task: int = 64,
         weights: Mapping[str, float] | None = None, multi_objective: bool = False,
         allow_heldout: bool = False, table: str | Path | None = None,
         merge_out: str | Path | None = None, study: str | None = None,
         storage_path: str | Path | None = None, device: str | None = None,
         progress: Callable[[dict], None] | None = None,
         recipe_dir: str | Path | None = None) -> TuneOutcome:
    """Run (or resume) the tune of the recipe file at ``recipe_path``; relative model paths
    resolve against ``recipe_dir`` (default: the file's folder)."""
    from engine.tune.objective import settings_for_recipe
    from engine.tune.study import (best_trial, open_study, pareto_numbers, run_tune, study_name,
                                   trials_table)
    from engine.tune.workers import check_ray_address, make_pool

    if trials < 1:
        raise ParameterError("--trials must be at least 1")
    if workers < 0:
        raise ParameterError("--workers must be 0 or more")
    from engine.device import resolve_device

    if device is not None:
        device = str(resolve_device(device))  # a bad device: one line, before any study exists
    space, midpoint = read_tune_recipe(recipe_path)
    recipe_dir = Path(recipe_dir) if recipe_dir is not None else Path(recipe_path).parent
    settings = settings_for_recipe(midpoint, recipe_dir=recipe_dir,
                                   objectives=objectives, n_per_task=n_per_task, weights=weights,
                                   allow_heldout=allow_heldout, device=device)
    if ray_address:
        check_ray_address(ray_address)  # before the study: nothing opened for an unreachable one
    tasks_order = list(settings.tasks or []) + [Path(f).stem for f in settings.eval_files]
    name = study or study_name(space, settings, sampler, seed, multi_objective)
    directions = ["maximize"] * (len(tasks_order) if multi_objective else 1)
    optuna_study, storage = open_study(name, sampler=sampler, seed=seed, directions=directions,
                                       storage_path=storage_path)
    batch = max(1, workers)
    pool = make_pool(settings, workers=workers, ray_address=ray_address)
    try:
        result = run_tune(space, pool.score_batch, optuna_study, trials=trials, batch_size=batch,
                          tasks_order=tasks_order, weights=dict(settings.weights),
                          multi_objective=multi_objective, progress=progress)
    finally:
        pool.close()
    best = best_trial(optuna_study, multi_objective, dict(settings.weights))
    outcome = TuneOutcome(best_number=result.best_number, best_score=result.best_score,
                          best_tasks=dict(best.user_attrs.get("tasks") or {}) if best else {},
                          best_recipe=result.best_recipe, study_name=name, storage=storage,
                          trials=trials, ran=result.ran, failed=result.failed,
                          pareto=pareto_numbers(optuna_study) if multi_objective else [])
    rows = trials_table(optuna_study, space)
    if out is not None:
        if result.best_recipe is None:
            raise ParameterError(f"every trial failed (last error: {rows[-1].get('error')}); "
                                 f"no best recipe to write; the study {name} is kept")
        write_text_atomic(Path(out), plain_yaml(result.best_recipe))
        outcome.outputs.append(Path(out))
    table_path = Path(table) if table else (Path(out).with_suffix(".trials.csv") if out else None)
    if table_path is not None:
        outcome.outputs.extend(write_table(rows, table_path))
    if multi_objective and out is not None:
        front = [r for r in rows if r["number"] in set(outcome.pareto)]
        outcome.outputs.extend(write_table(front, Path(out).with_suffix(".pareto.csv")))
    if merge_out is not None and result.best_recipe is not None:
        from engine.merge.executor import run_merge
        from engine.recipe import parse_recipe

        merged = run_merge(parse_recipe(result.best_recipe), merge_out,
                           recipe_dir=recipe_dir, device=device)
        outcome.merged = Path(merged.out)
    return outcome


__all__ = ["TuneOutcome", "plain_yaml", "read_tune_recipe", "table_csv", "tune", "write_table",
           "write_text_atomic"]
