"""``python -m engine repair --method M --aligned A --finetuned F --out DIR``: the fine-tune
repaired for safety against its aligned model (``engine.repair``), written atomically with a
manifest (method, parameters, per-matrix report, the inputs' fingerprints) and a model card.

``--unaligned U``: the unaligned model of IRR's and RESTA's safety vector (aligned - U); with
``--param safety_vector=alignment_delta`` U is the aligned model's own base instead (ours).
``--calibration FILE.jsonl``: safety data, harmful prompts with the aligned model's refusals
(the lines the aligned model answers as written are used); default: the zoo's refusal task.
``--task-data FILE.jsonl``: IRR's recalibration data; default: the fine-tune's zoo task.
``--param key=value`` (repeatable) sets the method's parameters (``python -m engine methods
repair NAME`` lists them).
"""

from __future__ import annotations

import json
import sys

from engine.text import printable
from engine.cli.progress import stderr_progress


def register(subparsers) -> None:
    from engine.repair.registry import list_methods

    parser = subparsers.add_parser("repair", help="repair a fine-tune's safety against its aligned model")
    parser.add_argument("--method", required=True, help=f"repair method ({', '.join(list_methods())})")
    parser.add_argument("--aligned", required=True, help="the aligned model folder (the fine-tune's parent)")
    parser.add_argument("--finetuned", required=True, help="the fine-tuned model folder (same layout)")
    parser.add_argument("--unaligned", default=None,
                        help="an unaligned model (irr, resta: safety vector = aligned - unaligned)")
    parser.add_argument("--calibration", default=None, metavar="FILE.jsonl",
                        help="safety data: {prompt, answer} lines of harmful prompts and the aligned "
                             "model's refusals (dev split)")
    parser.add_argument("--task-data", default=None, metavar="FILE.jsonl",
                        help="irr: the fine-tune's task data for the recalibration (dev split)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="method parameter (repeatable)")
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.set_defaults(func=run)


def run(args) -> int:
    from engine.cli.compress_cmd import parse_params
    from engine.repair.run import repair

    params = parse_params(args.param)

    progress = stderr_progress(args.quiet)

    result = repair(args.aligned, args.finetuned, args.out, args.method, params,
                    unaligned=args.unaligned, calibration=args.calibration,
                    task_data=args.task_data, device=args.device, progress=progress)
    if not args.quiet:
        print(file=sys.stderr)
    for warning in result.warnings:
        print(f"warning: {printable(warning)}", file=sys.stderr)
    summary = {"out": str(result.out), "method": result.method, "params": result.params,
               **result.summary, "seconds": round(result.seconds, 3)}
    kept = result.summary.get("kept_share")
    print(json.dumps(summary) if args.json else
          f"repaired {result.summary['matrices']} matrices with {result.method} into "
          f"{printable(str(result.out))}"
          + ("" if kept is None else f", {kept:.1%} of their delta entries kept")
          + f", {result.seconds:.1f}s")
    return 0
