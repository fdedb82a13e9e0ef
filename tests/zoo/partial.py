"""A partial zoo as an interrupted build leaves it, made from the quick zoo without training:
the published families' folders and tokenizer copied, ``zoo.json`` listing only them with
``complete: false`` and the rest under ``pending``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def partial_zoo(quick_zoo: str | Path, dest: Path, families=("small",)) -> Path:
    source = Path(quick_zoo)
    manifest = json.loads((source / "zoo.json").read_text())
    dest.mkdir(parents=True)
    shutil.copytree(source / manifest["tokenizer"], dest / manifest["tokenizer"])
    for family in families:
        shutil.copytree(source / family, dest / family)
    models = manifest["models"]
    manifest.update(complete=False,
                    models=[m for m in models if m["family"] in families],
                    pending=[m["path"] for m in models if m["family"] not in families])
    (dest / "zoo.json").write_text(json.dumps(manifest, indent=2))
    return dest
