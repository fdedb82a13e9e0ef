"""``python -m engine convert-pickle IN.bin [IN2.bin ...] --out DIR``: the only way a pickle
checkpoint enters the workbench. Loaded with ``torch.load(weights_only=True)`` (plain tensors,
containers and numbers; any other object refused, never a fallback), written as a safetensors
model folder with the vetted config.json and tokenizer files beside the checkpoint."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    parser = subparsers.add_parser("convert-pickle",
                                   help="convert a pickle checkpoint (.bin/.pt/.pth) to a safetensors model folder")
    parser.add_argument("checkpoint", nargs="+",
                        help="pickle checkpoint file, or all shards of one (in one folder, beside config.json)")
    parser.add_argument("--out", required=True, help="model folder to write (must not exist or be empty)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    parser.set_defaults(func=run)


def run(args) -> int:
    from engine.io import ModelFolder
    from engine.io.pickle_optin import convert_pickle

    out = convert_pickle(args.checkpoint, args.out)
    with ModelFolder(out) as folder:
        summary = {"out": str(out), "tensors": len(folder.tensor_names)}
    print(json.dumps(summary) if args.json else f"converted {summary['tensors']} tensors into {out}")
    return 0
