"""``python -m engine clusters --base B --finetuned F1 --finetuned F2 ... [--json]``: channel
clusters of every matrix's task vectors across the fine-tunes (the grouping Channel Merging
stores, as on the app's Channel clusters page). Cached in the DuckDB metric store like
``analyze``; bad input is one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from engine.cli.analyze_cmd import fmt_value, ProgressBar, metric_store, validated
from engine.text import printable


def register(subparsers) -> None:
    parser = subparsers.add_parser("clusters", help="channel clusters of fine-tunes' task vectors")
    parser.add_argument("--base", required=True, help="base model folder")
    parser.add_argument("--finetuned", action="append", required=True,
                        help="fine-tuned model folder (repeat; at least two)")
    parser.add_argument("--groups", type=int, default=None, help="groups per channel, G (default 2)")
    parser.add_argument("--clustering", choices=["agglomerative", "kmeans"], default=None,
                        help="clustering of normalised rows (default agglomerative)")
    parser.add_argument("--labels", action="store_true", help="include every channel's group labels (JSON)")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    parser.add_argument("--no-cache", action="store_true", help="recompute; do not read or write the cache")
    parser.add_argument("--cache", default=None, help="metric cache file (default: $DELTA_WORKBENCH_CACHE "
                        "or the workbench home)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from engine.analysis import ClusterParams, analyze_clusters
    from engine.device import resolve_device
    from engine.errors import ParameterError

    if len(args.finetuned) < 2:
        raise ParameterError("clusters needs at least two --finetuned models")
    params = validated(ClusterParams, num_groups=args.groups, clustering=args.clustering)
    device = resolve_device(args.device)
    progress = ProgressBar(not args.quiet)
    with metric_store(args) as store:
        try:
            result = analyze_clusters(args.base, args.finetuned, params, cache=store,
                                      progress=progress, device=device, include_labels=args.labels)
        finally:
            progress.close()
    if args.json:
        print(json.dumps(result, allow_nan=False))
        return 0
    layers = result["layers"]
    width = max((len(printable(layer["name"])) for layer in layers), default=6)
    print(f"base: {printable(result['base'])}")
    for i, name in enumerate(result["finetuned"]):
        print(f"[{i}] {printable(name)}")
    print(f"{'tensor':<{width}}  {'storage':>7} {'within':>7} {'between':>7}  most common split")
    for layer in layers:
        split = next(iter(layer["size_patterns"]), "-")
        print(f"{printable(layer['name']):<{width}}  {layer['storage_fraction']:>7.3f} "
              f"{fmt_value(layer['within_group_cosine'], 3):>7} {fmt_value(layer['between_group_cosine'], 3):>7}  {split}")
    c = result["cache"]
    print(f"cache: {c['hits']} hits, {c['misses']} computed", file=sys.stderr)
    return 0
