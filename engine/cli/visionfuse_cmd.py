"""``python -m engine visionfuse --base B --models M1 M2 [...] --out DIR``: fuse LLaVA members
that share the text LM ``B`` (``engine.visionfuse``): their LM deltas merged with a registered
merge method (``--merge-method``, task arithmetic by default; ``--param k=v`` its parameters,
``--weights`` one per member), each member's encoder and projector kept, the visual tokens
concatenated. Load the result with ``engine.visionfuse.load(DIR)``; ``python -m engine eval
DIR`` scores it.
"""

from __future__ import annotations

import json

from engine.text import printable


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "visionfuse", help="fuse multimodal members of one LM family (merged LM, concatenated "
                           "visual tokens)")
    parser.add_argument("--base", required=True, help="the text LM every member was built on")
    parser.add_argument("--models", nargs="+", required=True, help="LLaVA member folders (2+)")
    parser.add_argument("--merge-method", default="task_arithmetic",
                        help="merge method for the LM deltas (python -m engine methods merge)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="merge method parameter (repeatable)")
    parser.add_argument("--weights", nargs="+", type=float, default=None,
                        help="one weight (lambda_i) per member (default: 1/k each for "
                             "task_arithmetic, the mean of the deltas; else the method's)")
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    parser.set_defaults(func=run)


def run(args) -> int:
    from engine.cli.compress_cmd import parse_params
    from engine.visionfuse import fuse

    summary = fuse(args.base, args.models, args.out, args.merge_method,
                   parse_params(args.param), args.weights, device=args.device)
    print(json.dumps(summary) if args.json else
          f"fused {len(summary['members'])} members ({', '.join(summary['members'])}) with "
          f"{summary['method']} into {printable(summary['out'])}: "
          f"{summary['visual_tokens']} visual tokens per image, {summary['seconds']:.1f}s")
    return 0
