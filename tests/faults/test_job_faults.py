"""Issue 19 item 11a (reliability 18): the identical job submitted twice runs once.

Identity is the kind and the validated parameters (canonical JSON); title and key order do
not count. While the first is queued or running, a second submission (same session or
another one, threads or processes) returns its id; once it is finished, submitting it again
runs it again.
"""

from __future__ import annotations

import threading

from engine.jobs import JobManager, JobSpec


def _job_folders(root):
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def test_identical_submissions_while_queued_are_one_job(tmp_path):
    root = tmp_path / "jobs"
    manager = JobManager(root, max_running=0, gpu=False)  # nothing starts: the job stays queued
    first = manager.submit(JobSpec(kind="eval", title="one",
                                   params={"model_dir": "/m", "n_per_task": 2}))
    # the same work: other title, other key order, a default spelled out
    second = manager.submit(JobSpec(kind="eval", title="two",
                                    params={"n_per_task": 2, "tasks": None, "model_dir": "/m"}))
    assert second == first
    assert _job_folders(root) == [first]
    assert manager.get(first).status.state == "queued"
    other = manager.submit(JobSpec(kind="eval", params={"model_dir": "/m", "n_per_task": 3}))
    assert other != first and _job_folders(root) == sorted([first, other])


def test_two_sessions_submitting_at_once_get_one_job(tmp_path):
    root = tmp_path / "jobs"
    spec = JobSpec(kind="eval", params={"model_dir": "/m", "tasks": ["upper"]})
    sessions = 6
    barrier = threading.Barrier(sessions)
    ids: list[str] = []
    errors: list[BaseException] = []

    def session():
        try:
            manager = JobManager(root, max_running=0, gpu=False)  # each session its own manager
            barrier.wait(30)
            ids.append(manager.submit(spec))
        except BaseException as err:  # noqa: BLE001 - reported by the test thread
            errors.append(err)

    threads = [threading.Thread(target=session) for _ in range(sessions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert len(ids) == sessions and len(set(ids)) == 1
    assert _job_folders(root) == [ids[0]]


def test_resubmitting_a_running_job_runs_it_once(tmp_path, quick_zoo, quick_zoo_manifest):
    root = tmp_path / "jobs"
    manager = JobManager(root, gpu=False)
    model = str(quick_zoo / "small" / "reverse")
    spec = JobSpec(kind="eval", params={"model_dir": model, "tasks": ["reverse"], "n_per_task": 2})
    first = manager.submit(spec)
    assert manager.get(first).status.state == "running"
    pid = manager.get(first).status.pid
    assert JobManager(root, gpu=False).submit(spec) == first  # another session, same job
    assert manager.get(first).status.pid == pid  # not restarted
    assert manager.wait(first, timeout_s=300).state == "done", manager.get(first).log_tail()
    assert _job_folders(root) == [first]
    # finished: submitting it again is a new run
    again = manager.submit(spec)
    assert again != first and _job_folders(root) == sorted([first, again])
    assert manager.wait(again, timeout_s=300).state == "done"
