"""The job manager: spawned workers, progress on disk, failure, cancel, reload, GPU semaphore."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from engine.errors import ParameterError
from engine.jobs import JobManager, JobSpec


def _small_model(zoo: Path, manifest: dict, task: str = "reverse") -> str:
    entry = next(m for m in manifest["models"] if m["path"] == f"small/{task}")
    return str(zoo / entry["path"])


def test_eval_job_runs_in_a_worker_and_reports(tmp_path, quick_zoo, quick_zoo_manifest):
    manager = JobManager(tmp_path / "jobs", gpu=False)
    model = _small_model(quick_zoo, quick_zoo_manifest)
    job_id = manager.submit(JobSpec(kind="eval", params={"model_dir": model, "tasks": ["reverse"],
                                                         "n_per_task": 4}))
    status = manager.wait(job_id, timeout_s=300)
    job = manager.get(job_id)
    assert status.state == "done", job.log_tail()
    assert status.progress == 1.0 and status.pid != os.getpid()
    result = job.result()
    assert set(result["tasks"]) == {"reverse"} and result["tasks"]["reverse"]["n"] == 4
    # the worker wrote every file atomically: no temporary files are left in the job folder
    assert sorted(p.name for p in job.folder.iterdir()) == [
        "log.txt", "result.json", "spec.json", "status.json"]


def test_bad_spec_is_refused_at_submit_and_nothing_is_queued(tmp_path):
    manager = JobManager(tmp_path / "jobs", gpu=False)
    with pytest.raises(ParameterError, match="unknown job kind 'nope'"):
        manager.submit(JobSpec(kind="nope"))
    with pytest.raises(ValidationError):
        manager.submit(JobSpec(kind="eval", params={"model_dir": "/x", "bogus": 1}))
    assert manager.jobs() == []
    with pytest.raises(ParameterError, match="invalid job id"):
        manager.get("../etc")


def test_failed_job_shows_a_one_line_error(tmp_path):
    manager = JobManager(tmp_path / "jobs", gpu=False)
    missing = tmp_path / "no_such_model"
    job_id = manager.submit(JobSpec(kind="eval", params={"model_dir": str(missing)}))
    status = manager.wait(job_id, timeout_s=300)
    assert status.state == "failed"
    assert "\n" not in status.error and str(missing) in status.error
    assert "Traceback" not in status.error
    assert manager.get(job_id).result() is None


def test_cancel_stops_the_worker_and_leaves_nothing_half_written(tmp_path):
    manager = JobManager(tmp_path / "jobs", gpu=False)
    out = tmp_path / "zoo"
    job_id = manager.submit(JobSpec(kind="zoo_build", params={"out": str(out), "quick": True}))
    deadline = time.monotonic() + 240
    while manager.get(job_id).status.progress <= 0.0:  # training has started
        assert time.monotonic() < deadline, manager.get(job_id).log_tail()
        time.sleep(0.2)
    status = manager.cancel(job_id)
    assert status.state == "cancelled"
    assert not manager._alive(manager.get(job_id))
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if "staging" in p.name] == []


def test_dead_worker_is_marked_failed_and_a_new_manager_sees_jobs(tmp_path, quick_zoo,
                                                                  quick_zoo_manifest):
    root = tmp_path / "jobs"
    manager = JobManager(root, gpu=False)
    job_id = manager.submit(JobSpec(kind="zoo_build",
                                    params={"out": str(tmp_path / "z"), "quick": True}))
    pid = manager.get(job_id).status.pid
    # A page reload (or an app restart) builds a new manager over the same folder: the
    # running job is still there and still alive.
    reloaded = JobManager(root, gpu=False)
    assert [j.id for j in reloaded.jobs()] == [job_id]
    assert reloaded.get(job_id).status.state == "running"
    assert reloaded._alive(reloaded.get(job_id))
    os.killpg(pid, signal.SIGKILL)
    status = manager.wait(job_id, timeout_s=60)
    assert status.state == "failed" and "ended without finishing" in status.error


def test_gpu_semaphore_runs_one_gpu_job_at_a_time(tmp_path, quick_zoo, quick_zoo_manifest):
    manager = JobManager(tmp_path / "jobs", max_running=2, gpu=True)
    model = _small_model(quick_zoo, quick_zoo_manifest)
    # two different jobs (identical ones would be one job: tests/faults/test_job_faults.py)
    first = manager.submit(JobSpec(kind="eval", params={"model_dir": model, "tasks": ["upper"],
                                                        "n_per_task": 2}))
    second = manager.submit(JobSpec(kind="eval", params={"model_dir": model, "tasks": ["reverse"],
                                                         "n_per_task": 2}))
    states = {j.id: j.status.state for j in manager.jobs()}
    assert states == {first: "running", second: "queued"}
    assert manager.get(first).spec.uses_gpu
    assert manager.wait(second, timeout_s=300).state == "done"
    assert manager.get(first).status.state == "done"


def test_cancel_a_queued_job(tmp_path, quick_zoo, quick_zoo_manifest):
    manager = JobManager(tmp_path / "jobs", max_running=1, gpu=False)
    model = _small_model(quick_zoo, quick_zoo_manifest)
    first = manager.submit(JobSpec(kind="eval", params={"model_dir": model, "tasks": ["upper"],
                                                        "n_per_task": 2}))
    second = manager.submit(JobSpec(kind="eval", params={"model_dir": model, "tasks": ["reverse"],
                                                         "n_per_task": 2}))
    assert first != second
    assert manager.cancel(second).state == "cancelled"
    assert manager.wait(first, timeout_s=300).state == "done"
    assert manager.get(second).status.state == "cancelled"
    assert json.loads((manager.get(second).folder / "status.json").read_text())["pid"] is None
