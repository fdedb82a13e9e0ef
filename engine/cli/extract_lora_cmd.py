"""``python -m engine extract-lora --base B --finetuned F --rank R --out DIR``: a PEFT LoRA
adapter holding the best rank-R approximation of each linear layer's task vector."""

from __future__ import annotations

import json
import sys
from engine.cli.progress import stderr_progress


def register(subparsers) -> None:
    parser = subparsers.add_parser("extract-lora", help="extract a PEFT LoRA adapter from a fine-tune")
    parser.add_argument("--base", required=True, help="base model folder")
    parser.add_argument("--finetuned", required=True, help="fine-tuned model folder")
    parser.add_argument("--out", required=True, help="adapter folder (must not exist or be empty)")
    parser.add_argument("--rank", type=int, default=32, help="most singular triplets per module (default 32)")
    parser.add_argument("--sv-cutoff", type=float, default=None,
                        help="also drop singular values below this fraction of the largest")
    parser.add_argument("--embed-lora", action="store_true",
                        help="extract the input embeddings and output head as LoRA too")
    parser.add_argument("--save-module", action="append", default=[], metavar="NAME",
                        help="store this module whole (PEFT modules_to_save); repeatable")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="dtype of the stored factors")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.set_defaults(func=run)


def run(args) -> int:
    from pydantic import ValidationError

    from engine.errors import ParameterError
    from engine.lora.extract import ExtractOptions, extract_lora

    try:
        options = ExtractOptions(rank=args.rank, sv_cutoff=args.sv_cutoff, embed_lora=args.embed_lora,
                                 save_modules=args.save_module, dtype=args.dtype)
    except ValidationError as err:
        first = err.errors()[0]
        raise ParameterError(f"--{'-'.join(str(x) for x in first['loc']).replace('_', '-')}: "
                             f"{first['msg']}") from None

    progress = stderr_progress(args.quiet)

    result = extract_lora(args.base, args.finetuned, args.out, options, progress=progress)
    if not args.quiet:
        print(file=sys.stderr)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    summary = {"out": str(result.out), "modules": result.modules,
               "ranks": sorted(set(result.ranks.values())), "kept_energy": round(result.kept_energy, 6),
               "seconds": round(result.seconds, 3)}
    print(json.dumps(summary) if args.json else
          f"extracted {result.modules} modules (rank {', '.join(map(str, summary['ranks']))}, "
          f"{result.kept_energy:.1%} of the task vectors' energy) into {result.out} "
          f"in {result.seconds:.1f}s")
    return 0
