"""Issue 19 item 6 (reliability 15): a killed merge or compression leaves no staging forever.

End to end: a real ``python -m engine merge`` / ``compress`` is paused in the middle of its
work (its staging folder, preallocated shards included, is on disk), killed with SIGKILL, and
the next start of any entry point (another ``python -m engine`` command, the job worker, the
app) removes the orphan, wherever its destination was. A live writer's staging folder, and
anything that is not a staging folder of ours, is never touched.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from engine.io.staging import LOCK_NAME, REGISTRY_NAME, make_staging_dir, sweep_all_staging
from tests.io.builders import staging_leftovers, tiny_tensors, write_model

REPO_ROOT = Path(__file__).resolve().parents[2]

# The real CLI entry point, paused (not patched out) once its staging folder holds work.
PAUSED_CLI = textwrap.dedent("""
    import sys, time
    from engine.compress.registry import get_method
    from engine.merge.spec import MergeSpec

    def pause_after(real, calls):
        def paused(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                print("READY", flush=True)
                time.sleep(600)
            return real(*args, **kwargs)
        return paused

    MergeSpec.merge_into = pause_after(MergeSpec.merge_into, [])
    module = get_method("magnitude").module
    module.encode = pause_after(module.encode, [])
    from engine.__main__ import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.fixture()
def env(tmp_path, monkeypatch):
    """A workbench home of the test's own (registry, exports, zoo); models and outputs elsewhere."""
    home = tmp_path / "home"
    values = {"DELTA_WORKBENCH_HOME": str(home), "DELTA_WORKBENCH_EXPORT_DIR": str(home / "exports"),
              "DELTA_WORKBENCH_ZOO": str(home / "zoo"), "DELTA_WORKBENCH_CACHE": str(home / "m.duckdb")}
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return {**os.environ, **values, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture()
def models(tmp_path):
    root = tmp_path / "models"
    return [write_model(root / name, tiny_tensors(seed=seed)) for name, seed in (("base", 0), ("ft", 1))]


def _start_paused(env, *argv) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_CLI, *argv], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300  # importing torch on a busy 2-core machine is slow
    line = b""
    while time.monotonic() < deadline and proc.poll() is None:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            break
    if line.strip() != b"READY":
        proc.kill()
        _, err = proc.communicate(timeout=30)
        pytest.fail(f"the paused command did not get going: {err.decode()[-2000:]}")
    return proc


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()


def _engine(env, *argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *argv], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _registry(env) -> list[str]:
    folder = Path(env["DELTA_WORKBENCH_HOME"]) / REGISTRY_NAME
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@pytest.mark.parametrize("command", ["merge", "compress"])
def test_killed_cli_run_is_swept_at_the_next_start_and_a_live_one_is_not(command, tmp_path, env,
                                                                         models):
    base, ft = models
    out = tmp_path / "anywhere" / "out"  # beside no staging area: only the registry knows it
    out.parent.mkdir()
    if command == "merge":
        recipe = tmp_path / "recipe.yml"
        recipe.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(base),
                                          "models": [{"model": str(ft), "parameters": {"weight": 0.5}}]}))
        argv = ["merge", str(recipe), "--out", str(out), "--quiet"]
    else:
        argv = ["compress", "--base", str(base), "--finetuned", str(ft), "--method", "magnitude",
                "--ratio", "4", "--out", str(out), "--quiet"]
    proc = _start_paused(env, *argv)
    try:
        staging = [out.parent / n for n in staging_leftovers(out.parent)]
        assert len(staging) == 1 and (staging[0] / LOCK_NAME).is_file()
        assert len([p for p in staging[0].iterdir() if p.name != LOCK_NAME]) >= 1  # work on disk
        assert len(_registry(env)) == 1
        # the writer is alive: another start keeps its folder
        again = _engine(env, "methods")
        assert again.returncode == 0, again.stderr
        assert staging[0].is_dir() and len(_registry(env)) == 1
        assert "staging" not in again.stderr
    finally:
        _kill(proc)
    assert staging[0].is_dir() and not out.exists()  # killed: the orphan stays until a start
    after = _engine(env, "methods")
    assert after.returncode == 0, after.stderr
    assert "removed 1 staging folder" in after.stderr
    assert staging_leftovers(out.parent) == [] and not out.exists()
    assert _registry(env) == []


def _orphan(dest: Path) -> Path:
    """A staging folder whose owner is dead, as a kill -9 leaves it (registered)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(dest)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = json.loads((staging / LOCK_NAME).read_text())
    lock["pid"] = dead.pid
    (staging / LOCK_NAME).write_text(json.dumps(lock))
    (staging / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 4096)
    return staging


def test_every_staging_area_is_swept_but_nothing_else(tmp_path, env):
    home = Path(env["DELTA_WORKBENCH_HOME"])
    areas = [home / "exports", home / "artifacts", home / "jobs", home]
    for area in areas:
        area.mkdir(parents=True, exist_ok=True)
    orphans = [_orphan(area / "x") for area in areas] + [_orphan(tmp_path / "far" / "away")]
    live = make_staging_dir(home / "exports" / "live")
    # not ours: a user's folder with a staging-like name but no lock (recent), a symlink
    foreign = home / "exports" / ".mine.staging-keep"
    foreign.mkdir()
    (foreign / "data").write_text("mine")
    target = tmp_path / "target"
    target.mkdir()
    os.symlink(target, home / "artifacts" / ".l.staging-abc")
    removed = sweep_all_staging()
    assert sorted(removed) == sorted(orphans)
    assert not any(p.exists() for p in orphans)
    assert live.is_dir() and (foreign / "data").read_text() == "mine"
    assert (home / "artifacts" / ".l.staging-abc").is_symlink() and target.is_dir()
    assert len(_registry(env)) == 1  # the live writer's entry only


def test_a_resumed_zoo_build_keeps_its_staging(tmp_path, env):
    zoo = Path(env["DELTA_WORKBENCH_ZOO"])
    zoo.parent.mkdir(parents=True, exist_ok=True)
    staging = _orphan(zoo)
    assert sweep_all_staging(keep_for=[zoo]) == [] and staging.is_dir()
    assert sweep_all_staging() == [staging]


def test_job_worker_sweeps_at_its_start(tmp_path, env):
    from engine.jobs import JobManager, JobSpec

    staging = _orphan(tmp_path / "far" / "merged")
    manager = JobManager(tmp_path / "jobs", gpu=False)
    job = manager.submit(JobSpec(kind="eval", params={"model_dir": str(tmp_path / "absent")}))
    assert manager.wait(job, timeout_s=300).state == "failed"  # any job: the worker starts
    assert not staging.exists() and _registry(env) == []


def test_app_start_sweeps_every_area(tmp_path, env):
    from pages._shared import startup_sweep

    home = Path(env["DELTA_WORKBENCH_HOME"])
    (home / "artifacts").mkdir(parents=True)
    in_artifacts = _orphan(home / "artifacts" / "a")  # the area the app used to skip
    far = _orphan(tmp_path / "far" / "b")
    assert sorted(startup_sweep()) == sorted([str(in_artifacts), str(far)])
    assert not in_artifacts.exists() and not far.exists()


# Beyond the list: a fisher/regmean merge spills every model's statistics (as big as the
# model) to a scratch folder; killed hard, it used to stay in the temporary folder forever.
PAUSED_CALIBRATION = textwrap.dedent("""
    import time, torch
    import engine.merge.calibration as calibration

    calls = []

    def fake_statistics(kind, folder, task, settings):
        calls.append(1)
        if len(calls) == 2:  # the first model's statistics are on disk
            print("READY", flush=True)
            time.sleep(600)
        return {"w": torch.ones(1024)}

    calibration.model_statistics = fake_statistics
    calibration.compute_stats("fisher", ["a", "b"], [None, None], None, spill=True)
""")


def test_killed_calibration_leaves_no_statistics_behind(tmp_path, env):
    tmp = tmp_path / "tmp"  # the child's temporary folder, where the spill used to go
    tmp.mkdir()
    child_env = {**env, "TMPDIR": str(tmp)}
    scratch = Path(env["DELTA_WORKBENCH_HOME"]) / "scratch"

    def leftovers():
        return [p for root in (tmp, scratch) if root.is_dir() for p in root.iterdir()]

    proc = subprocess.Popen([sys.executable, "-c", PAUSED_CALIBRATION], cwd=REPO_ROOT,
                            env=child_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 300)
        assert ready and proc.stdout.readline().strip() == b"READY", proc.stderr.read1().decode()
        spilled = leftovers()
        assert len(spilled) == 1 and any(spilled[0].iterdir())
        assert _engine(child_env, "methods").returncode == 0
        assert spilled[0].is_dir()  # alive: kept
    finally:
        _kill(proc)
    after = _engine(child_env, "methods")
    assert after.returncode == 0, after.stderr
    assert leftovers() == [] and _registry(env) == []
