"""``python -m engine tune RECIPE.yml --trials N --out BEST.yml``: search the ranged parameters
of a mergekit recipe (``{range: [lo, hi]}``, ``layer_groups: G``; ``engine.tune.space``) with an
Optuna study (CMA-ES, TPE or random), each trial merged and scored in memory on the dev split
(``engine.tune``). The study is kept in the workbench home: the same command again resumes it.
Writes the best recipe (plain mergekit YAML), the trials table beside it (``BEST.trials.csv``,
and ``.parquet`` with pyarrow) and, with ``--merge-out DIR``, the best merged model.
"""

from __future__ import annotations

import json
import sys

from engine.errors import ParameterError
from engine.text import printable


def register(subparsers) -> None:
    parser = subparsers.add_parser("tune", help="tune a recipe's ranged parameters on the dev split")
    parser.add_argument("recipe", help="tune recipe: a mergekit recipe with {range: [lo, hi]} values")
    parser.add_argument("--trials", type=int, required=True, help="total trials of the study")
    parser.add_argument("--out", required=True, help="the best recipe, plain mergekit YAML")
    parser.add_argument("--sampler", default="cmaes",
                        help="cmaes (default), tpe, random, or adamerging (coefficients learned "
                             "by entropy minimisation; task_arithmetic recipes)")
    parser.add_argument("--objective", action="append", default=None, metavar="zoo|FILE.jsonl",
                        help="what is scored (repeatable): zoo (the fine-tunes' own zoo tasks) or "
                             "an eval file (its dev half); default zoo")
    parser.add_argument("--task-weight", action="append", default=[], metavar="TASK=W",
                        help="weight of a task in the mean (repeatable; others weigh 1)")
    parser.add_argument("--multi-objective", action="store_true",
                        help="one objective per task; the Pareto front goes to BEST.pareto.csv")
    parser.add_argument("--workers", type=int, default=0, help="parallel worker processes (or Ray actors)")
    parser.add_argument("--ray", default=None, metavar="ADDRESS", help="run the workers as actors "
                        "on the Ray cluster at HOST:PORT")
    parser.add_argument("--seed", type=int, default=0, help="sampler seed")
    parser.add_argument("--n-per-task", type=int, default=64, help="dev examples per task")
    parser.add_argument("--study", default=None, help="study name (default: derived from the inputs)")
    parser.add_argument("--table", default=None, help="trials table CSV (default BEST.trials.csv)")
    parser.add_argument("--merge-out", default=None, metavar="DIR", help="also write the best merged model")
    parser.add_argument("--allow-heldout", action="store_true",
                        help="tune on the HELD-OUT split (its scores stop being a fair report)")
    parser.add_argument("--steps", type=int, default=None, help="adamerging: optimisation steps")
    parser.add_argument("--granularity", default="task", help="adamerging: task or tensor")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.set_defaults(func=run)


def parse_weights(items: list[str]) -> dict[str, float]:
    weights = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise ParameterError(f"--task-weight {item!r}: expected TASK=NUMBER") from None
        if not sep or not name.strip():
            raise ParameterError(f"--task-weight {item!r}: expected TASK=NUMBER")
    return weights


def run(args) -> int:
    import warnings

    from engine.merge.spec import IgnoredParameterWarning

    warnings.simplefilter("ignore", IgnoredParameterWarning)
    if args.allow_heldout:
        print("WARNING: tuning on the HELD-OUT split (--allow-heldout): its scores are no longer "
              "a fair report of the merge", file=sys.stderr)
    if args.sampler == "adamerging":
        return _run_adamerging(args)

    def progress(p: dict) -> None:
        if args.quiet:
            return
        what = f"failed: {printable(p['error'])}" if p.get("error") else f"score {p['score']:.4f}"
        best = f"{p['best']:.4f}" if p.get("best") is not None else "-"
        print(f"trial {p['trial']} ({p['finished']}/{p['trials']}): {what}; best {best}",
              file=sys.stderr, flush=True)

    from engine.tune.run import tune

    outcome = tune(args.recipe, trials=args.trials, out=args.out, sampler=args.sampler,
                   objectives=args.objective or ["zoo"], workers=args.workers,
                   ray_address=args.ray, seed=args.seed, n_per_task=args.n_per_task,
                   weights=parse_weights(args.task_weight), multi_objective=args.multi_objective,
                   allow_heldout=args.allow_heldout, table=args.table, merge_out=args.merge_out,
                   study=args.study, device=args.device, progress=progress)
    summary = {"best_trial": outcome.best_number, "best_score": outcome.best_score,
               "best_tasks": outcome.best_tasks, "study": outcome.study_name,
               "storage": str(outcome.storage), "ran": outcome.ran, "failed": outcome.failed,
               "outputs": [str(p) for p in outcome.outputs],
               "merged": str(outcome.merged) if outcome.merged else None}
    if outcome.pareto:
        summary["pareto"] = outcome.pareto
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"best trial {outcome.best_number}: dev score {outcome.best_score:.4f} "
              f"({', '.join(f'{printable(k)} {v:.3f}' for k, v in outcome.best_tasks.items())}); "
              f"wrote {', '.join(printable(str(p)) for p in outcome.outputs)}"
              + (f"; merged into {printable(str(outcome.merged))}" if outcome.merged else ""))
    return 0


def _run_adamerging(args) -> int:
    from engine.tune.adamerging_run import run_adamerging_cmd

    return run_adamerging_cmd(args)
