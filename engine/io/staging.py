"""Staging folders for atomic writes, their owner lock, and the sweep of orphans.

A writer builds its output in ``.<name>.staging-<random>`` beside the destination, then renames
it in one step. The staging folder holds a lock file with the owner's pid (and, on Linux, the
process start time, so a recycled pid is not mistaken for the owner). A folder whose owner is
gone is an orphan left by a crash or a kill; ``sweep_orphan_staging`` removes those.

Every staging folder is also recorded, while it is in progress, in a small registry under the
workbench home (``<home>/staging-registry``), because a destination may be anywhere on disk.
``sweep_all_staging`` sweeps every staging area the workbench owns (exports, artifacts, jobs,
the zoo's folder, the home, its scratch folder, and every registered folder); each entry point (the CLI, the app,
the job worker) calls it when it starts. Only folders with our staging name whose owner is
dead are removed, never a live writer's, never anything else.
"""

from __future__ import annotations

import hashlib
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
REGISTRY_NAME = "staging-registry"
_REGISTRY_ENTRY_MAX_BYTES = 8192


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
    _register(staging)


def _registry_dir() -> Path:
    from engine.settings import workbench_home

    return workbench_home() / REGISTRY_NAME


def _registry_entry(staging: Path) -> Path:
    digest = hashlib.sha256(str(Path(staging).absolute()).encode()).hexdigest()[:32]
    return _registry_dir() / f"{digest}.json"


def _register(staging: Path) -> None:
    """Record ``staging`` so that the sweep finds it wherever it is. Best effort: a home that
    cannot be written must not stop an export (the folder is still swept when it lies in a
    known area)."""
    try:
        entry = _registry_entry(staging)
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"staging": str(Path(staging).absolute())}))
        os.replace(tmp, entry)
    except OSError:
        pass


def unregister_staging(staging: Path | None) -> None:
    """Forget a staging folder that was renamed into place or removed."""
    if staging is None:
        return
    try:
        _registry_entry(staging).unlink(missing_ok=True)
    except OSError:
        pass


def make_staging_dir(dest: Path) -> Path:
    """Create the staging folder beside ``dest`` and write its owner lock."""
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.staging-", dir=dest.parent))
    write_owner_lock(staging, dest)
    return staging


def make_scratch_dir(label: str) -> Path:
    """A private working folder (``<home>/scratch/.<label>.staging-*``) that follows the staging
    convention, owner lock and registry included, so that what a run killed hard leaves there
    (calibration statistics as big as the models) is swept at the next start like any staging
    folder. Remove it with :func:`discard_staging`."""
    from engine.settings import workbench_home

    parent = workbench_home() / "scratch"
    parent.mkdir(parents=True, exist_ok=True)
    return make_staging_dir(parent / label)


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
        unregister_staging(staging)
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


def _sweep_candidate(candidate: Path, now: float, min_age_s: float) -> bool:
    """Remove ``candidate`` when it is an orphan staging folder (see sweep_orphan_staging);
    True when it was removed."""
    if not STAGING_RE.match(candidate.name):
        return False
    try:
        st = os.lstat(candidate)
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        return False
    age = now - st.st_mtime
    if age < min_age_s:
        return False
    alive = owner_alive(candidate)
    if alive or (alive is None and age < max(min_age_s, UNLOCKED_GRACE_S)):
        return False
    remove_tree(candidate)
    return not candidate.exists()


def sweep_orphan_staging(parent: str | Path, *, min_age_s: float = 0.0, keep=None) -> list[Path]:
    """Remove orphan staging folders directly inside ``parent``; return what was removed.

    A staging folder is an orphan when it is at least ``min_age_s`` old (by mtime) and its lock
    names no live process; a folder without a readable lock is an orphan once it is also older
    than a grace period of 60 s. Symlinks and non-folders with a staging name are left alone,
    and so is a folder for which ``keep(path)`` is true.
    """
    parent = Path(parent)
    removed: list[Path] = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    now = time.time()
    for name in names:
        candidate = parent / name
        if keep is not None and keep(candidate):
            continue
        if _sweep_candidate(candidate, now, min_age_s):
            unregister_staging(candidate)
            removed.append(candidate)
    return removed


def _sweep_registry(keep) -> list[Path]:
    """Sweep the registered staging folders; drop entries whose folder is gone or replaced."""
    removed: list[Path] = []
    folder = _registry_dir()
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    now = time.time()
    for name in names:
        entry = folder / name
        try:
            st = os.lstat(entry)
            if not stat.S_ISREG(st.st_mode) or st.st_size > _REGISTRY_ENTRY_MAX_BYTES:
                continue  # not one of ours
            recorded = json.loads(entry.read_text())["staging"]
            candidate = Path(recorded)
            if not (isinstance(recorded, str) and candidate.is_absolute()
                    and STAGING_RE.match(candidate.name)):
                raise ValueError("not a staging path")
        except OSError:
            continue
        except (ValueError, KeyError, TypeError):
            if now - st.st_mtime > UNLOCKED_GRACE_S:  # torn or foreign entry, long abandoned
                entry.unlink(missing_ok=True)
            continue
        if keep(candidate):
            continue
        if _sweep_candidate(candidate, now, 0.0):
            removed.append(candidate)
        elif os.path.isdir(candidate) and not os.path.islink(candidate):
            continue  # a live writer's folder, or one too young to judge: keep its entry
        entry.unlink(missing_ok=True)  # swept, gone, or replaced by something not ours
    return removed


def staging_areas() -> list[Path]:
    """The folders the workbench's own writers put staging folders in."""
    from engine import settings

    home = settings.workbench_home()
    areas = [settings.export_dir(), settings.artifacts_dir(), settings.jobs_dir(),
             settings.zoo_dir().parent, home, home / "scratch"]
    return list(dict.fromkeys(Path(a).absolute() for a in areas))


def sweep_all_staging(*, keep_for: list[Path] | tuple = ()) -> list[Path]:
    """Sweep every staging area we own (see the module docstring); return what was removed.

    ``keep_for``: destinations whose orphan staging must survive (a zoo build that resumes
    adopts the staging folder of the interrupted build). Never raises: a sweep must not stop
    the command that runs it."""
    kept = [Path(dest).absolute() for dest in keep_for]

    def keep(candidate: Path) -> bool:
        return any(candidate.parent == dest.parent and candidate.name.startswith(f".{dest.name}.staging-")
                   for dest in kept)

    removed: list[Path] = []
    try:
        for area in staging_areas():
            removed += sweep_orphan_staging(area, keep=keep)
        removed += _sweep_registry(keep)
    except (OSError, ValueError) as err:  # a broken setting or home: the command still runs
        import logging

        logging.getLogger(__name__).warning("staging sweep stopped: %s", err)
    return removed


def write_file_atomic(path: str | Path, data: str | bytes) -> None:
    """Write one small file so a reader sees the old content or the new, never half (a temp
    file beside it, fsynced, renamed over it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
