"""`python -m engine merge RECIPE.yml --out DIR`: run a mergekit-format recipe, atomically."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from engine.merge.multistage import read_documents, run_multistage
from engine.recipe import load_recipe
from engine.text import printable
from engine.cli.progress import stderr_progress


def register(subparsers) -> None:
    parser = subparsers.add_parser("merge", help="merge models per a mergekit-format YAML recipe")
    parser.add_argument("recipe", help="recipe YAML (mergekit format, plus our methods)")
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--max-shard-gb", type=float, default=1.0, help="shard size in GiB")
    parser.add_argument("--eval", action="store_true",
                        help="score the merged model on the zoo tasks before it is published; the "
                             "table goes into its model card (README.md) and manifest")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    parser.add_argument("--timings", metavar="PATH", default=None,
                        help="write seconds per stage (read, convert, merge, check, write, verify, "
                             "hash, fsync, finalize, waits; stages on different threads overlap) "
                             "to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.set_defaults(func=run)


# The merge's threads (reader, merge, writer, checker) release the GIL in every kernel, syscall,
# hash and memcmp; the interpreter's forced switch every 5 ms only preempts the short Python
# stretches between those, handing the GIL around more often than that helps. Measured on the
# 270M bench triple (2 cores, fresh processes, alternating, median of 12/10/5): linear 2.24 s
# at 20 ms vs 2.30 s at 5 ms, slerp 2.46 vs 2.50, ties 4.11 vs 4.12.
SWITCH_INTERVAL_S = 0.02


def run(args) -> int:
    import warnings

    sys.setswitchinterval(SWITCH_INTERVAL_S)  # this process is the merge's (see above)

    from engine.merge.executor import run_merge
    from engine.merge.spec import IgnoredParameterWarning

    # ignored parameters come back in result.warnings, printed below as one line each
    warnings.simplefilter("ignore", IgnoredParameterWarning)
    docs = read_documents(args.recipe)
    if len(docs) > 1:  # mergekit-multi: several named merges, the unnamed one written to --out
        return _run_stages(args, docs)
    recipe = load_recipe(args.recipe)

    progress = stderr_progress(args.quiet)

    result = run_merge(recipe, args.out, recipe_dir=Path(args.recipe).parent, device=args.device,
                       progress=progress, max_shard_bytes=int(args.max_shard_gb * 2**30),
                       evaluate=args.eval)
    if not args.quiet:
        print(file=sys.stderr)
    if args.timings:
        Path(args.timings).write_text(json.dumps({"method": recipe.merge_method, "tensors": result.tensors,
                                                  "device": result.device, "seconds": result.timings},
                                                 indent=2) + "\n")
    for warning in result.warnings:
        print(f"warning: {printable(warning)}", file=sys.stderr)
    summary = {"out": str(result.out), "tensors": result.tensors, "seconds": round(result.seconds, 3),
               "device": result.device, "method": recipe.merge_method}
    if result.evaluation is not None:
        summary["evaluation"] = result.evaluation
    print(json.dumps(summary) if args.json else
          f"merged {result.tensors} tensors with {recipe.merge_method} into {result.out} "
          f"in {result.seconds:.1f}s on {result.device}")
    if result.evaluation is not None and not args.json:
        from engine.export_card import evaluation_table

        print("evaluation: " + ", ".join(f"{printable(name)} {value:.3f}" for name, value
                                         in evaluation_table(result.evaluation).items()))
    return 0


def _run_stages(args, docs) -> int:
    progress = stderr_progress(args.quiet)

    result, stages = run_multistage(docs, args.out, source=str(args.recipe),
                                    recipe_dir=Path(args.recipe).parent, device=args.device,
                                    progress=progress, max_shard_bytes=int(args.max_shard_gb * 2**30),
                                    evaluate=args.eval)
    if not args.quiet:
        print(file=sys.stderr)
    for warning in result.warnings:
        print(f"warning: {printable(warning)}", file=sys.stderr)
    summary = {"out": str(result.out), "tensors": result.tensors, "seconds": round(result.seconds, 3),
               "device": result.device, "stages": stages}
    print(json.dumps(summary) if args.json else
          f"merged {len(stages)} intermediate merge(s) ({', '.join(printable(s) for s in stages)}) and "
          f"the final one ({result.tensors} tensors) into {result.out}")
    return 0
