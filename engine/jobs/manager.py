"""The job manager: queue, start, watch and cancel workers; state on disk.

The app holds one manager per process (``st.cache_resource``). ``poll()`` is cheap and is
what a page calls on each refresh: it marks dead workers failed and starts queued jobs while
there is room (``max_running`` CPU jobs; at most one GPU job when CUDA is present, the GPU
semaphore). Workers are fresh interpreters in their own session (process group), so cancel
can signal the worker and anything it started, and closing the browser tab does not stop them.

A job is identified by its kind and validated parameters (canonical JSON): submitting a job
identical to one that is queued or running returns that job's id instead of queueing a
second run (two sessions pressing the same button see one job). The check and the queueing
hold a file lock in the jobs folder, so managers in several threads or processes agree. A
finished job (done, failed, cancelled) submitted again runs again: its outputs may have been
moved or removed since, and a failed one may succeed now.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from engine.errors import ParameterError
from engine.io.staging import _pid_alive, _process_start_ticks
from engine.jobs.spec import JobSpec, JobStatus, read_json, write_json_atomic

SUBMIT_LOCK = ".submit.lock"
CANCEL_GRACE_S = 10.0  # after SIGTERM, how long a worker has to clean up before SIGKILL
PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class JobRecord:
    id: str
    spec: JobSpec
    status: JobStatus
    folder: Path

    @property
    def log_path(self) -> Path:
        return self.folder / "log.txt"

    def log_tail(self, max_chars: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(0, os.SEEK_END)
                size = handle.tell()
                handle.seek(max(0, size - max_chars))
                return handle.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def result(self) -> dict | None:
        path = self.folder / "result.json"
        return read_json(path) if self.status.state == "done" and path.exists() else None


class JobManager:
    def __init__(self, root: str | Path, *, max_running: int = 1, gpu: bool | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_running = max_running
        if gpu is None:
            import torch

            gpu = torch.cuda.is_available()
        self.gpu = gpu
        self._children: dict[str, subprocess.Popen] = {}

    # -- submit and inspect -------------------------------------------------------------------
    def submit(self, spec: JobSpec) -> str:
        """Validate ``spec`` against its kind, queue it, start it if there is room."""
        from engine.jobs.kinds import get_kind

        kind = get_kind(spec.kind)
        kind.params_class.model_validate(spec.params)  # bad params fail here, not in a worker
        spec = spec.model_copy(update={"uses_gpu": bool(self.gpu and kind.may_use_gpu),
                                       "title": spec.title or spec.kind})
        identity = job_identity(spec)
        with self._submit_lock():
            for job in self.jobs():
                if job.status.state in ("queued", "running") and job_identity(job.spec) == identity:
                    return job.id  # the same work is already under way: one run, both see it
            job_id = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
            folder = self.root / job_id
            folder.mkdir()
            # status first: a job folder is listed once spec.json exists, and then it is queued
            write_json_atomic(folder / "status.json", JobStatus().model_dump())
            write_json_atomic(folder / "spec.json", spec.model_dump())
        self.poll()
        return job_id

    def get(self, job_id: str) -> JobRecord:
        folder = self._folder(job_id)
        spec = JobSpec.model_validate(read_json(folder / "spec.json"))
        status = JobStatus.model_validate(read_json(folder / "status.json"))
        return JobRecord(job_id, spec, status, folder)

    def jobs(self) -> list[JobRecord]:
        """Every job, newest first (unreadable job folders are skipped)."""
        out = []
        for folder in self.root.iterdir():
            if folder.is_dir() and (folder / "spec.json").exists():
                try:
                    out.append(self.get(folder.name))
                except Exception:  # noqa: BLE001 - a damaged job folder must not hide the rest
                    continue
        return sorted(out, key=lambda j: j.status.submitted, reverse=True)

    def running(self) -> list[JobRecord]:
        return [j for j in self.jobs() if j.status.state == "running"]

    # -- lifecycle ----------------------------------------------------------------------------
    def poll(self) -> None:
        """Reap finished workers, fail dead ones, start queued jobs while there is room."""
        jobs = self.jobs()
        for job in jobs:
            if job.status.state == "running" and not self._alive(job):
                # A worker that died without writing a final state (killed, out of memory).
                latest = self.get(job.id)
                if latest.status.state == "running":
                    self._set(job.id, state="failed", finished=time.time(),
                              error="the worker process ended without finishing "
                                    "(killed or out of memory); see the log")
        jobs = self.jobs()
        running = [j for j in jobs if j.status.state == "running"]
        queued = sorted((j for j in jobs if j.status.state == "queued"), key=lambda j: j.status.submitted)
        for job in queued:
            if len(running) >= self.max_running:
                break
            if job.spec.uses_gpu and any(r.spec.uses_gpu for r in running):
                continue  # the GPU semaphore: one GPU job at a time
            self._start(job)
            running.append(self.get(job.id))

    def cancel(self, job_id: str, wait_s: float = CANCEL_GRACE_S) -> JobStatus:
        """Stop a queued or running job. A worker gets SIGTERM (its cleanup removes staging
        folders), then SIGKILL after ``wait_s``."""
        job = self.get(job_id)
        if job.status.state == "queued":
            self._set(job_id, state="cancelled", finished=time.time(), message="cancelled")
            return self.get(job_id).status
        if job.status.state != "running" or job.status.pid is None:
            return job.status
        pid = job.status.pid
        if self._alive(job):
            self._signal(pid, signal.SIGTERM)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and self._alive(self.get(job_id)):
                time.sleep(0.1)
            if self._alive(self.get(job_id)):
                self._signal(pid, signal.SIGKILL)
                self._wait_child(job_id, 5.0)
        if self.get(job_id).status.state == "running":
            self._set(job_id, state="cancelled", finished=time.time(), message="cancelled")
        return self.get(job_id).status

    def wait(self, job_id: str, timeout_s: float = 600.0, interval_s: float = 0.2) -> JobStatus:
        """Block until a job is final (for scripts and tests; pages poll instead)."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.poll()
            status = self.get(job_id).status
            if status.final:
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {status.state} after {timeout_s} s")
            time.sleep(interval_s)

    def mark_ingested(self, job_id: str) -> None:
        self._set(job_id, ingested=True)

    # -- internals ----------------------------------------------------------------------------
    @contextmanager
    def _submit_lock(self):
        """Serialise submissions over this jobs folder (threads and processes alike)."""
        fd = os.open(self.root / SUBMIT_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _folder(self, job_id: str) -> Path:
        if not job_id or "/" in job_id or job_id.startswith(".") or "\x00" in job_id:
            raise ParameterError(f"invalid job id {job_id!r}")
        folder = self.root / job_id
        if not (folder / "spec.json").exists():
            raise ParameterError(f"no such job {job_id!r}", path=folder)
        return folder

    def _set(self, job_id: str, **fields) -> None:
        path = self._folder(job_id) / "status.json"
        status = JobStatus.model_validate(read_json(path)).model_copy(update=fields)
        write_json_atomic(path, status.model_dump())

    def _start(self, job: JobRecord) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(PROJECT_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        with open(job.log_path, "ab") as log:
            child = subprocess.Popen(
                [sys.executable, "-m", "engine.jobs.worker", str(job.folder)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=str(PROJECT_ROOT), env=env, start_new_session=True)
        self._children[job.id] = child
        # Record the pid now: the worker rewrites it once it runs, but a poll in between
        # must see a live process, not a dead "running" job.
        self._set(job.id, state="running", pid=child.pid,
                  pid_start=_process_start_ticks(child.pid), started=time.time(),
                  message="starting")

    def _alive(self, job: JobRecord) -> bool:
        child = self._children.get(job.id)
        if child is not None:
            return child.poll() is None  # our own child: poll() also reaps it
        pid = job.status.pid
        if pid is None or not _pid_alive(pid):
            return False
        start = _process_start_ticks(pid)
        return job.status.pid_start is None or start is None or start == job.status.pid_start

    def _wait_child(self, job_id: str, timeout_s: float) -> None:
        child = self._children.get(job_id)
        if child is not None:
            try:
                child.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass

    @staticmethod
    def _signal(pid: int, sig: int) -> None:
        try:
            os.killpg(pid, sig)  # the worker leads its own session: reach its children too
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def job_identity(spec: JobSpec) -> str:
    """What makes two jobs the same work: the kind and its validated parameters (defaults
    filled in), as canonical JSON. Title and GPU flag do not count."""
    from engine.jobs.kinds import get_kind

    try:
        params = get_kind(spec.kind).params_class.model_validate(spec.params).model_dump(mode="json")
    except Exception:  # noqa: BLE001 - an old job of a removed kind: only its raw spec identifies it
        params = spec.params
    return json.dumps({"kind": spec.kind, "params": params}, sort_keys=True,
                      separators=(",", ":"), default=str)
