"""``python -m engine inspect DIR [--json] [--check-finite]``: inventory of a model folder.

Bad input is refused by the reader with a named error (one line, exit 2, from __main__).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

from engine.text import printable


def register(subparsers) -> None:
    parser = subparsers.add_parser("inspect", help="validate a model folder and list its tensors")
    parser.add_argument("folder", help="local model folder (config.json + safetensors)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--check-finite", action="store_true",
                        help="load every tensor and refuse NaN/Inf")
    parser.set_defaults(func=run)


def inventory(model) -> dict:
    """Everything inspect shows about a ModelFolder, as plain data."""
    from engine.io.header import TORCH_TO_SAFETENSORS

    dtypes = Counter(TORCH_TO_SAFETENSORS[model.info(n).dtype] for n in model.tensor_names)
    return {
        "folder": str(model.path),
        "architectures": model.config.get("architectures"),
        "model_type": model.config.get("model_type"),
        "tensor_count": len(model.tensor_names),
        "parameter_count": model.num_parameters,
        "total_bytes": model.total_bytes,
        "dtypes": dict(sorted(dtypes.items())),
        "shards": [{"file": p.name, "size": h.file_size} for p, h in model.headers.items()],
        "tensors": [{"name": n, "shape": list(model.info(n).shape),
                     "dtype": TORCH_TO_SAFETENSORS[model.info(n).dtype], "file": model.info(n).file.name}
                    for n in model.tensor_names],
    }


def _human(count: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(count) < 1000 or suffix == "T":
            return f"{count:.1f}{suffix}{unit}" if suffix else f"{int(count)}{unit}"
        count /= 1000.0
    return str(count)


def run(args: argparse.Namespace) -> int:
    from engine.io import ModelFolder  # imported here: building the CLI parser stays torch-free

    with ModelFolder(args.folder) as model:
        if args.check_finite:
            model.check_finite()  # NonFiniteError -> one line, exit 2
        inv = inventory(model)
    if args.check_finite:
        inv["finite"] = True
    if args.json:
        print(json.dumps(inv, indent=2))
        return 0
    # Names come from the folder's own files: escaped, so they cannot drive the terminal.
    arch = printable(", ".join(map(str, inv["architectures"] or [])) or "?")
    print(f"folder:      {printable(inv['folder'])}")
    print(f"model:       {arch} ({printable(inv['model_type'] or '?')})")
    print(f"tensors:     {inv['tensor_count']}")
    print(f"parameters:  {inv['parameter_count']} ({_human(inv['parameter_count'])})")
    print(f"bytes:       {inv['total_bytes']} ({_human(inv['total_bytes'], 'B')})")
    print("dtypes:      " + ", ".join(f"{k}: {v}" for k, v in inv["dtypes"].items()))
    if args.check_finite:
        print("finite:      yes (every tensor scanned)")
    print("shards:")
    for shard in inv["shards"]:
        print(f"  {printable(shard['file'])}  {shard['size']} bytes")
    names = [printable(t["name"]) for t in inv["tensors"]]
    width = max(map(len, names), default=0)
    print("tensors:")
    for name, t in zip(names, inv["tensors"]):
        print(f"  {name:<{width}}  {str(tuple(t['shape'])):<16} {t['dtype']}")
    return 0
