"""``python -m engine incompatibility MODEL_A MODEL_B [--base-a BA --base-b BB] [--json]``: the
neural-incompatibility maps of the app's page (layer x layer activation CKA on the zoo's probe
prompts, and a basis-invariant parameter similarity through the shared token embeddings; with
both bases, of the task vectors). Cached in the DuckDB metric store; bad input is one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    parser = subparsers.add_parser("incompatibility",
                                   help="layer x layer similarity of two models of different scale")
    parser.add_argument("model_a", help="model folder A (usually the smaller)")
    parser.add_argument("model_b", help="model folder B")
    parser.add_argument("--base-a", default=None, help="A's base: compare task vectors, not weights")
    parser.add_argument("--base-b", default=None, help="B's base (give both bases or neither)")
    parser.add_argument("--n-per-task", type=int, default=None, help="probe prompts per zoo task (default 8)")
    parser.add_argument("--task", action="append", default=None, dest="tasks",
                        help="zoo task whose prompts probe the models (repeat; default all)")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    parser.add_argument("--no-cache", action="store_true", help="recompute; do not read or write the cache")
    parser.add_argument("--cache", default=None, help="metric cache file (default: $DELTA_WORKBENCH_CACHE "
                        "or the workbench home)")
    parser.set_defaults(func=run)


def _row(values) -> str:
    return " ".join("    -" if v is None else f"{v:5.2f}" for v in values)


def run(args: argparse.Namespace) -> int:
    from engine.analysis.incompatibility import IncompatibilityParams, incompatibility_maps
    from engine.cli.analyze_cmd import metric_store, validated

    params = validated(IncompatibilityParams, n_per_task=args.n_per_task, tasks=args.tasks)
    with metric_store(args) as store:
        result = incompatibility_maps(args.model_a, args.model_b, params, base_a=args.base_a,
                                      base_b=args.base_b, cache=store)
    if args.json:
        print(json.dumps(result, allow_nan=False))
        return 0
    act, par = result["activation"], result["parameters"]
    print(f"A: {result['model_a']}\nB: {result['model_b']}")
    print(f"activation CKA (rows: A's layers 0..{len(act['cka']) - 1}, index 0 = embeddings; "
          f"{act['probes']} probes compared by {act['rows']}):")
    for i, row in enumerate(act["cka"]):
        print(f"  {i:>2} {_row(row)}")
    print(f"parameter similarity ({par.get('measure', 'debiased CKA')}), mean |value| over "
          f"modules (A's layers {par['layers_a']} x B's {par['layers_b']}):")
    for i, row in zip(par["layers_a"], par["mean_abs"]):
        print(f"  {i:>2} {_row(row)}")
    return 0
