"""``python -m engine transfer --method M --source LARGE_FT --source-base LARGE_BASE --target
SMALL_BASE --task T --out DIR``: the target base with the source fine-tune's task knowledge
transferred across scales (``engine.transfer``: PostPKT, LaTen, or their controls), written
atomically as a full model of the target's shape with a manifest and a model card.

``--data FILE.jsonl``: the examples ({prompt, answer} lines; the dev split is used) instead of
the zoo task's train split; the task still names the held-out examples that score the result.
``--param key=value`` (repeatable) sets the method's parameters (PostPKT: n_seed, rank, alpha,
n_train, epochs, lr, batch_size, micro_batch, warmup_ratio, dropout, extract_from, curve_steps;
LaTen: n_extract, n_align, align_per_step, rate, lr, weight_decay, penalty, init_std,
checkpoint). ``--baselines`` also scores the control and a plain fine-tune of the same budget.
"""

from __future__ import annotations

import json
import sys

from engine.text import printable
from engine.transfer import METHODS
from engine.cli.progress import stderr_progress


def register(subparsers) -> None:
    parser = subparsers.add_parser("transfer", help="transfer a larger fine-tune's knowledge into a smaller base")
    parser.add_argument("--method", required=True, help="transfer method (" + ", ".join(METHODS) + ")")
    parser.add_argument("--source", required=True, help="the larger fine-tuned model folder (the teacher)")
    parser.add_argument("--source-base", required=True, help="the source's base model folder")
    parser.add_argument("--target", required=True, help="the smaller base model folder (the student)")
    parser.add_argument("--task", required=True, help="zoo task the knowledge is for (scored on its held-out set)")
    parser.add_argument("--data", default=None, metavar="FILE.jsonl", help="own {prompt, answer} examples (dev split)")
    parser.add_argument("--seed", type=int, default=None, help="seed (default: the paper's, 1 for PostPKT, 42 for LaTen)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="method parameter (repeatable)")
    parser.add_argument("--n-eval", type=int, default=128, help="held-out examples that score the task")
    parser.add_argument("--baselines", action="store_true",
                        help="also score the control and a plain fine-tune of the same step budget")
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.set_defaults(func=run)


def run(args) -> int:
    from engine.cli.compress_cmd import parse_params
    from engine.transfer.run import transfer

    params = parse_params(args.param)

    progress = stderr_progress(args.quiet)

    result = transfer(args.source, args.source_base, args.target, args.out, args.method, args.task,
                      params, data=args.data, seed=args.seed, device=args.device,
                      n_eval=args.n_eval, baselines=args.baselines, progress=progress)
    if not args.quiet:
        print(file=sys.stderr)
    for warning in result.warnings:
        print(f"warning: {printable(warning)}", file=sys.stderr)
    summary = {"out": str(result.out), "method": result.method, "task": result.task,
               "params": result.params, "accuracy": result.accuracy, "curve": result.curve,
               "seconds": round(result.seconds, 3)}
    acc = result.accuracy
    print(json.dumps(summary) if args.json else
          f"transferred {result.task} by {result.method} into {printable(str(result.out))}: "
          + ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in acc.items())
          + f", {result.seconds:.1f}s")
    return 0
