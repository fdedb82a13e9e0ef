"""``python -m engine eval MODEL_DIR [--json]``: task accuracies and perplexity of a model."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="score a model folder on every zoo task (greedy, exact match) and perplexity")
    parser.add_argument("model_dir", help="safetensors model folder")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--tasks", default=None, help="comma-separated task names (default: all)")
    parser.add_argument("-n", "--n-per-task", type=int, default=None,
                        help="held-out examples per task (default 128)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from engine.errors import ParameterError
    from engine.evaluate import evaluate_folder

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    if args.n_per_task is not None and args.n_per_task < 1:
        raise ParameterError("--n-per-task must be at least 1")
    result = evaluate_folder(args.model_dir, tasks=tasks, n_per_task=args.n_per_task)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{'task':<12} {'accuracy':>8} {'n':>5}")
    for name, score in result["tasks"].items():
        print(f"{name:<12} {score['accuracy']:8.3f} {score['n']:5d}")
    if result["perplexity"] is not None:
        print(f"{'perplexity':<12} {result['perplexity']:8.3f}")
    return 0
