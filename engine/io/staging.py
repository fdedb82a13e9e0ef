"""Staging folders for atomic writes, their owner lock, and the sweep of orphans.

A writer builds its output in ``.<name>.staging-<random>`` beside the destination, then renames
it in one step. The staging folder holds a lock file with the owner's pid (and, on Linux, the
process start time, so a recycled pid is not mistaken for the owner). A folder whose owner is
gone is an orphan left by a crash or a kill; ``sweep_orphan_staging`` removes those.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
import time
from pathlib import Path

from engine.errors import ExportError

LOCK_NAME = ".staging-owner.json"
STAGING_RE = re.compile(r"^\..+\.staging-[A-Za-z0-9_]+$")
# A staging folder without a readable lock is only an orphan once it is this old: its writer
# may be between creating the folder and writing the lock, or between removing the lock and
# the final rename.
UNLOCKED_GRACE_S = 60.0


def _process_start_ticks(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot (Linux /proc); None where unknown."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses; fields resume after ')'.
    fields = raw[raw.rfind(")") + 2:].split()
    try:
        return int(fields[19])  # field 22 of the full line: starttime
    except (IndexError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    # A zombie (killed, not yet reaped) still answers kill(0) but will never write again.
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
        if state[state.rfind(")") + 2:].split()[0] in ("Z", "X"):
            return False
    except (OSError, IndexError):
        pass
    return True


def write_owner_lock(staging: Path, dest: Path) -> None:
    """Make this process the owner of ``staging`` (a build that adopts an orphan calls it too)."""
    lock = {"pid": os.getpid(), "start_ticks": _process_start_ticks(os.getpid()),
            "dest": dest.name, "created": time.time()}
    (staging / LOCK_NAME).write_text(json.dumps(lock))


def make_staging_dir(dest: Path) -> Path:
    """Create the staging folder beside ``dest`` and write its owner lock."""
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.staging-", dir=dest.parent))
    write_owner_lock(staging, dest)
    return staging


def is_inside(child: Path, folder: Path) -> bool:
    return child == folder or folder in child.parents


def check_destination(dest: Path, input_folders) -> None:
    """Refuse a destination that is a symlink, a file, a non-empty folder, or overlaps an input
    folder (never write into an input, never put an input inside an output)."""
    if dest.is_symlink():
        raise ExportError("destination is a symlink; refused", path=dest)
    if dest.exists():
        if not dest.is_dir():
            raise ExportError("destination exists and is not a folder", path=dest)
        if any(dest.iterdir()):
            raise ExportError("destination exists and is not empty; refused", path=dest)
    real_dest = dest.resolve()
    for folder in input_folders:
        real_input = Path(folder).resolve()
        if is_inside(real_dest, real_input):
            raise ExportError(f"destination lies inside input model folder {folder} (they "
                              "overlap); never writing into an input", path=dest)
        if is_inside(real_input, real_dest):
            raise ExportError(f"input model folder {folder} lies inside the destination (they "
                              "overlap)", path=dest)


def make_staging_with_parents(dest: Path) -> tuple[Path, list[Path]]:
    """Create missing parents of ``dest`` and the staging folder beside it; returns the staging
    folder and the parents created (so :func:`discard_staging` can remove them again)."""
    missing = []
    parent = dest.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    created: list[Path] = []
    try:
        for folder in reversed(missing):
            folder.mkdir()
            created.append(folder)
        return make_staging_dir(dest), created
    except BaseException:
        discard_staging(None, created)
        raise


def discard_staging(staging: Path | None, created_parents: list[Path]) -> None:
    """Remove a staging folder and the (still empty) parents created for it."""
    if staging is not None:
        remove_tree(staging)
    for parent in reversed(created_parents):
        try:
            parent.rmdir()  # only if still empty
        except OSError:
            break
    created_parents.clear()


def owner_alive(staging: Path) -> bool | None:
    """True/False from the lock file; None when there is no readable lock."""
    try:
        lock = json.loads((staging / LOCK_NAME).read_text())
        pid = int(lock["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not _pid_alive(pid):
        return False
    recorded = lock.get("start_ticks")
    current = _process_start_ticks(pid)
    if recorded is not None and current is not None and recorded != current:
        return False  # the pid was recycled by another process
    return True


def remove_tree(path: Path) -> None:
    """Remove a folder we created; never follows a symlink out of it."""
    if path.is_symlink():
        path.unlink(missing_ok=True)
        return
    shutil.rmtree(path, ignore_errors=True)


def sweep_orphan_staging(parent: str | Path, *, min_age_s: float = 0.0) -> list[Path]:
    """Remove orphan staging folders directly inside ``parent``; return what was removed.

    A staging folder is an orphan when it is at least ``min_age_s`` old (by mtime) and its lock
    names no live process; a folder without a readable lock is an orphan once it is also older
    than a grace period of 60 s. Symlinks and non-folders with a staging name are left alone.
    """
    parent = Path(parent)
    removed: list[Path] = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    now = time.time()
    for name in names:
        if not STAGING_RE.match(name):
            continue
        candidate = parent / name
        try:
            st = os.lstat(candidate)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode):
            continue
        age = now - st.st_mtime
        if age < min_age_s:
            continue
        alive = owner_alive(candidate)
        if alive or (alive is None and age < max(min_age_s, UNLOCKED_GRACE_S)):
            continue
        remove_tree(candidate)
        if not candidate.exists():
            removed.append(candidate)
    return removed
