"""Turn a path a user typed into a safe, resolved path inside the allowed roots.

Rules (strict on purpose; each refusal is a PathNotAllowedError naming what was typed):
- Nothing is expanded: a leading ``~`` is refused (type the full path), ``$VAR`` stays literal.
- The path must be absolute; a ``..`` component is refused even if it would land inside a root.
- Symlinks are resolved, and the resolved target must lie inside one of the allowed roots
  (each root resolved too), so a link that escapes is refused.
- What exists must be a folder or a regular file: FIFOs, sockets and device files are refused
  (checked with stat, which never blocks on a FIFO). ``kind`` narrows it to "dir" or "file".
- ``must_exist=False`` allows a path that does not exist yet (an export destination).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePath
from typing import Iterable, Literal

from engine.errors import PathNotAllowedError


def _resolved_roots(allowed_roots: Iterable[str | Path]) -> list[Path]:
    roots = []
    for root in allowed_roots:
        try:
            roots.append(Path(root).resolve(strict=True))
        except (OSError, RuntimeError):
            continue  # a root that does not exist allows nothing
    return roots


def resolve_user_path(
    text: str | Path,
    allowed_roots: Iterable[str | Path],
    *,
    must_exist: bool = True,
    kind: Literal["any", "dir", "file"] = "any",
) -> Path:
    """Validate and resolve a user-typed path; see the module docstring for the rules."""
    raw = str(text).strip() if text is not None else ""
    shown = raw or repr(text)
    if not raw:
        raise PathNotAllowedError("empty path", path=shown)
    if "\x00" in raw:
        raise PathNotAllowedError("path contains a NUL character", path=repr(raw))
    if raw.startswith("~"):
        raise PathNotAllowedError("'~' is not expanded; type the full path", path=shown)
    pure = PurePath(raw)
    if not pure.is_absolute():
        raise PathNotAllowedError("path must be absolute", path=shown)
    if ".." in pure.parts:
        raise PathNotAllowedError("'..' in a path is refused", path=shown)

    roots = _resolved_roots(allowed_roots)
    if not roots:
        raise PathNotAllowedError("no allowed roots are configured", path=shown)
    try:
        resolved = Path(raw).resolve(strict=must_exist)
    except FileNotFoundError:
        raise PathNotAllowedError("path does not exist", path=shown) from None
    except (OSError, RuntimeError) as err:
        raise PathNotAllowedError(f"path cannot be resolved: {err}", path=shown) from None

    if not any(resolved == root or root in resolved.parents for root in roots):
        where = f" (resolves to {resolved})" if str(resolved) != raw.rstrip("/") else ""
        raise PathNotAllowedError(f"outside the allowed roots{where}", path=shown)

    try:
        mode = os.stat(resolved).st_mode
    except FileNotFoundError:
        if must_exist:
            raise PathNotAllowedError("path does not exist", path=shown) from None
        return resolved
    except OSError as err:
        raise PathNotAllowedError(f"cannot stat path: {err.strerror}", path=shown) from None
    is_dir, is_file = stat.S_ISDIR(mode), stat.S_ISREG(mode)
    if not (is_dir or is_file):
        raise PathNotAllowedError("not a folder or regular file (FIFO, socket or device refused)",
                                  path=shown)
    if kind == "dir" and not is_dir:
        raise PathNotAllowedError("expected a folder", path=shown)
    if kind == "file" and not is_file:
        raise PathNotAllowedError("expected a file", path=shown)
    return resolved
