"""sweep_orphan_staging: removes dead writers' folders, keeps live or unrelated ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from engine.io import sweep_orphan_staging
from engine.io.staging import LOCK_NAME, make_staging_dir, owner_alive


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _age(path, seconds):
    old = time.time() - seconds
    os.utime(path, (old, old))


def test_live_owner_kept_dead_owner_swept(tmp_path):
    live = make_staging_dir(tmp_path / "out")
    dead = make_staging_dir(tmp_path / "other")
    lock = json.loads((dead / LOCK_NAME).read_text())
    lock["pid"] = _dead_pid()
    (dead / LOCK_NAME).write_text(json.dumps(lock))
    (dead / "model-00001-of-00002.safetensors").write_bytes(b"partial")
    assert owner_alive(live) is True and owner_alive(dead) is False
    assert sweep_orphan_staging(tmp_path) == [dead]
    assert live.is_dir() and not dead.exists()


def test_recycled_pid_is_not_the_owner(tmp_path):
    staging = make_staging_dir(tmp_path / "out")
    lock = json.loads((staging / LOCK_NAME).read_text())
    if lock["start_ticks"] is None:
        return  # no /proc: start times unknown, pid liveness alone decides
    lock["start_ticks"] -= 1  # our pid, but "started" at another time: another process
    (staging / LOCK_NAME).write_text(json.dumps(lock))
    assert sweep_orphan_staging(tmp_path) == [staging]


def test_unlocked_folder_swept_only_after_grace(tmp_path):
    young = tmp_path / ".out.staging-abc123"
    old = tmp_path / ".x.staging-def456"
    young.mkdir()
    old.mkdir()
    _age(old, 3600)
    assert sweep_orphan_staging(tmp_path) == [old]
    assert young.is_dir()


def test_min_age_protects_recent_orphans(tmp_path):
    staging = make_staging_dir(tmp_path / "out")
    lock = json.loads((staging / LOCK_NAME).read_text())
    lock["pid"] = _dead_pid()
    (staging / LOCK_NAME).write_text(json.dumps(lock))
    assert sweep_orphan_staging(tmp_path, min_age_s=600) == []
    _age(staging, 1200)
    assert sweep_orphan_staging(tmp_path, min_age_s=600) == [staging]


def test_unrelated_names_files_and_symlinks_untouched(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".f.staging-abc").write_text("a file, not a folder")
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep").write_text("x")
    os.symlink(target, tmp_path / ".l.staging-abc")
    for p in tmp_path.iterdir():
        if not p.is_symlink():
            _age(p, 3600)
    assert sweep_orphan_staging(tmp_path) == []
    assert (target / "keep").exists() and (tmp_path / ".l.staging-abc").is_symlink()


def test_missing_parent_sweeps_nothing(tmp_path):
    assert sweep_orphan_staging(tmp_path / "absent") == []
