"""Transfer outputs in a folder, read from their manifests (JSON only: no model is loaded)."""

from __future__ import annotations

import json
from pathlib import Path

MANIFEST = "delta_workbench_manifest.json"
MAX_BYTES = 1 << 24


def transfer_outputs(folder: str | Path) -> list[dict]:
    """``[{"path", "method", "task", "source", "seed", "accuracy", "curve"}]`` for every model
    folder directly under ``folder`` whose manifest says it is a transfer output, newest first.
    Unreadable or foreign manifests are skipped."""
    root = Path(folder)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        file = child / MANIFEST
        if child.is_symlink() or not file.is_file() or file.is_symlink() or file.stat().st_size > MAX_BYTES:
            continue
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError):
            continue
        info = data.get("transfer") if isinstance(data, dict) and data.get("kind") == "transfer" else None
        if not isinstance(info, dict):
            continue
        found.append({"path": str(child), "method": info.get("method"), "task": info.get("task"),
                      "source": info.get("source"), "seed": info.get("seed"),
                      "accuracy": info.get("accuracy") or {}, "curve": info.get("curve") or [],
                      "mtime": file.stat().st_mtime})
    return sorted(found, key=lambda r: -r["mtime"])
