"""``python -m engine decompress ART --base B --out MODEL``: rebuild a Hugging Face folder.

The base must be the one the artifact was made against (tensor layout, file sizes and
weights' sha256 are checked); a wrong base or a corrupt artifact is one line, exit 2.
"""

from __future__ import annotations

import json
import sys

from engine.cli.progress import stderr_progress


def register(subparsers) -> None:
    parser = subparsers.add_parser("decompress", help="rebuild a fine-tune from an artifact and its base")
    parser.add_argument("artifact", help="artifact folder written by `compress`")
    parser.add_argument("--base", required=True, help="the base model folder it was made against")
    parser.add_argument("--out", required=True, help="output model folder (must not exist or be empty)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.set_defaults(func=run)


def run(args) -> int:
    from engine.compress import decompress

    progress = stderr_progress(args.quiet)

    result = decompress(args.artifact, args.base, args.out, device=args.device, progress=progress)
    if not args.quiet:
        print(file=sys.stderr)
    summary = {"out": str(result.out), "method": result.method, "tensors": result.tensors,
               "seconds": round(result.seconds, 3)}
    print(json.dumps(summary) if args.json else
          f"rebuilt {result.tensors} tensors ({result.method}) into {result.out} in {result.seconds:.1f}s")
    return 0
