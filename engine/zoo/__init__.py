"""The demo zoo: a small Llama family trained offline on CPU from synthetic tasks.

``build_zoo(out, quick=False, seed=0, progress=None)`` trains and writes it, one family at a
time; ``load_manifest(dir)`` reads ``zoo.json`` (also of a zoo still being built: it lists the
models published so far, ``zoo_complete(manifest)`` tells); ``default_zoo_dir()`` is where the
app keeps it.
"""

from __future__ import annotations

import os
from pathlib import Path

from engine.errors import ConfigError, DeltaWorkbenchError

MANIFEST_NAME = "zoo.json"
ENV_VAR = "DELTA_WORKBENCH_ZOO"
ROLES = ("base", "finetune")


def default_zoo_dir() -> Path:
    """``$DELTA_WORKBENCH_ZOO`` if set, else ``~/.cache/delta_workbench/zoo``."""
    value = os.environ.get(ENV_VAR)
    if value:
        return Path(value).expanduser()
    return Path.home() / ".cache" / "delta_workbench" / "zoo"


def zoo_complete(manifest: dict) -> bool:
    """Whether every model of the zoo's plan is built (a zoo written before families were
    published one by one has no ``complete`` key: it was written whole)."""
    return manifest.get("complete", True) is True


def load_manifest(zoo_dir: str | Path) -> dict:
    """The zoo's manifest, checked: every model entry names a folder inside the zoo.

    Each entry gets ``abs_path`` (absolute folder path) added for convenience. A zoo still being
    built is accepted: ``models`` lists what is published, ``pending`` what is to come.
    """
    root = Path(zoo_dir).absolute()
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ConfigError("not a zoo: no zoo.json (build it with `python -m engine zoo build`)",
                          path=root)
    # read as a model folder's side files are: a regular file inside the zoo, bounded, strict
    # JSON (a deeply nested or huge zoo.json is a named error, not a crash)
    from engine.io.reader import _read_small_json, _regular_file_inside  # here: keeps torch out

    try:
        real = _regular_file_inside(root.resolve(), MANIFEST_NAME, "zoo manifest")
    except DeltaWorkbenchError as err:
        raise ConfigError(f"unreadable zoo manifest: {err.reason}", path=path) from None
    manifest = _read_small_json(real, ConfigError, "zoo manifest")
    models = manifest.get("models") if isinstance(manifest, dict) else None
    if not isinstance(models, list) or not models:
        raise ConfigError("zoo manifest has no model list", path=path)
    pending = manifest.get("pending", [])
    if not isinstance(manifest.get("complete", True), bool) or not isinstance(pending, list) \
            or not all(isinstance(p, str) for p in pending):
        raise ConfigError("zoo manifest has a bad complete/pending field", path=path)
    for entry in models:
        rel = entry.get("path") if isinstance(entry, dict) else None
        if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ConfigError(f"zoo manifest entry with a bad path: {rel!r}", path=path)
        if entry.get("role") not in ROLES:
            raise ConfigError(f"zoo model {rel!r} has an unknown role {entry.get('role')!r}",
                              path=path)
        folder = (root / rel).resolve()
        if root.resolve() not in folder.parents or not folder.is_dir():
            raise ConfigError(f"zoo model folder missing or outside the zoo: {rel!r}", path=path)
        entry["abs_path"] = str(folder)
    return manifest


def build_zoo(out, quick: bool = False, seed: int = 0, progress=None, n_eval: int | None = None,
              resume: bool = False):
    """Train and write the zoo; see ``engine.zoo.build.build_zoo``."""
    from engine.zoo.build import build_zoo as _build

    return _build(out, quick=quick, seed=seed, progress=progress, n_eval=n_eval, resume=resume)


__all__ = ["ENV_VAR", "MANIFEST_NAME", "build_zoo", "default_zoo_dir", "load_manifest",
           "zoo_complete"]
