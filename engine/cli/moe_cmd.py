"""`python -m engine moe CONFIG.yml --out DIR`: a mergekit-moe config, assembled atomically."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from engine.text import printable
from engine.cli.progress import stderr_progress


def register(subparsers) -> None:
    parser = subparsers.add_parser("moe", help="assemble a mixture of experts per a mergekit-moe config")
    parser.add_argument("config", help="mergekit-moe config YAML (base_model, experts, gate_mode, ...)")
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--device", default=None, help="cpu or cuda for the hidden-state gates "
                                                       "(default: cuda when present)")
    parser.add_argument("--max-shard-gb", type=float, default=1.0, help="shard size in GiB")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.set_defaults(func=run)


def run(args) -> int:
    from engine.moe import load_moe_config, run_moe

    config = load_moe_config(args.config)

    progress = stderr_progress(args.quiet)

    result = run_moe(config, args.out, config_dir=Path(args.config).parent, device=args.device,
                     progress=progress, max_shard_bytes=int(args.max_shard_gb * 2**30))
    if not args.quiet:
        print(file=sys.stderr)
    for warning in result.warnings:
        print(f"warning: {printable(warning)}", file=sys.stderr)
    summary = {"out": str(result.out), "tensors": result.tensors, "seconds": round(result.seconds, 3),
               "device": result.device, "architecture": result.architecture,
               "experts": len(config.experts), "gate_mode": config.gate_mode}
    print(json.dumps(summary) if args.json else
          f"assembled a {result.architecture} of {len(config.experts)} experts "
          f"({config.gate_mode} gates, {result.tensors} tensors) into {result.out} "
          f"in {result.seconds:.1f}s on {result.device}")
    return 0
