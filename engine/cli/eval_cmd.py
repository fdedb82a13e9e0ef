"""``python -m engine eval MODEL_DIR [--json]``: task accuracies and perplexity of a model.

Without ``--data``/``--text`` the zoo's tasks are scored; with them, the user's own files
(``engine.evaluate.own_data``): each JSONL file a task named by its stem, each text file a
perplexity named by its stem.
"""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="score a model folder on zoo tasks or your own files (greedy exact match, perplexity)")
    parser.add_argument("model_dir", help="safetensors model folder, or a PEFT LoRA adapter folder")
    parser.add_argument("--base", default=None, help="the base model of a LoRA adapter")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--tasks", default=None, help="comma-separated zoo task names (default: all)")
    parser.add_argument("-n", "--n-per-task", type=int, default=None,
                        help="held-out examples per zoo task (default 128)")
    parser.add_argument("--data", action="append", default=[], metavar="FILE.jsonl",
                        help='your own task: lines of {"prompt": ..., "answer": ...}; repeatable')
    parser.add_argument("--text", action="append", default=[], metavar="FILE.txt",
                        help="your own text for perplexity, one document per line; repeatable")
    parser.add_argument("--split", choices=["all", "dev", "heldout"], default="all",
                        help="score every line (default) or one half of the stable split")
    parser.add_argument("--chat-template", action="store_true",
                        help="wrap each prompt in the tokenizer's chat template")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from engine.errors import ParameterError

    if args.data or args.text:
        if args.tasks or args.n_per_task is not None:
            raise ParameterError("--tasks/--n-per-task are for the zoo's tasks; not with --data/--text")
        result = _own_data(args)
    else:
        if args.chat_template or args.split != "all":
            raise ParameterError("--chat-template/--split apply to --data/--text files")
        from engine.evaluate import evaluate_folder

        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
        if args.n_per_task is not None and args.n_per_task < 1:
            raise ParameterError("--n-per-task must be at least 1")
        result = evaluate_folder(args.model_dir, tasks=tasks, n_per_task=args.n_per_task, base=args.base)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{'task':<20} {'accuracy':>8} {'n':>5}")
    for name, score in result["tasks"].items():
        print(f"{name:<20} {score['accuracy']:8.3f} {score['n']:5d}")
    perplexity = result["perplexity"]
    if isinstance(perplexity, dict):
        for name, value in perplexity.items():
            print(f"{'perplexity ' + name:<20} {value:8.3f}")
    elif perplexity is not None:
        print(f"{'perplexity':<20} {perplexity:8.3f}")
    return 0


def _own_data(args) -> dict:
    """Read every file first (a bad line fails before any model is loaded), then score."""
    from engine.errors import ConfigError
    from engine.evaluate.loading import load_model_folder
    from engine.evaluate.own_data import read_jsonl, read_text, score_sets

    sets = [read_jsonl(p) for p in args.data] + [read_text(p) for p in args.text]
    sets = [s.split(args.split) for s in sets]
    for s in sets:
        if len(s) == 0:
            raise ConfigError(f"no lines in the {args.split} split", path=s.path)
    model, tokenizer = load_model_folder(args.model_dir, base=args.base)
    return score_sets(model, tokenizer, sets, chat_template=args.chat_template)
