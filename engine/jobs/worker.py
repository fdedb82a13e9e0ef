"""The worker process: ``python -m engine.jobs.worker JOB_DIR`` runs one job.

It is a fresh interpreter (the manager spawns it; nothing is forked, so CUDA is safe), reads
``spec.json``, reports progress into ``status.json`` and writes ``result.json``. SIGTERM (the
manager's cancel) raises :class:`JobCancelled` inside the running code, so every ``except
BaseException`` cleanup on the way out runs: staging folders of the atomic writers are removed
and nothing half-written is left. Errors of the workbench become one line in the status; any
other exception also leaves its traceback in ``log.txt``.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from pathlib import Path

from engine.errors import DeltaWorkbenchError
from engine.jobs.spec import JobSpec, JobStatus, read_json, write_json_atomic
from engine.io.staging import _process_start_ticks, sweep_all_staging

STATUS_INTERVAL_S = 0.25  # progress is written at most this often (the last write always)


class JobCancelled(BaseException):
    """Raised in the worker when the manager cancels the job (SIGTERM)."""


def _raise_cancelled(signum, frame):  # noqa: ARG001
    raise JobCancelled()


class StatusWriter:
    def __init__(self, job_dir: Path):
        self.path = job_dir / "status.json"
        self.status = JobStatus.model_validate(read_json(self.path))
        self._last = 0.0

    def update(self, force: bool = False, **fields) -> None:
        self.status = self.status.model_copy(update=fields)
        now = time.monotonic()
        if force or now - self._last >= STATUS_INTERVAL_S:
            write_json_atomic(self.path, self.status.model_dump())
            self._last = now

    def progress(self, fraction: float, message: str) -> None:
        self.update(progress=max(0.0, min(1.0, float(fraction))), message=str(message)[:300])


def run_job(job_dir: Path) -> int:
    from engine.jobs.kinds import get_kind

    status = StatusWriter(job_dir)
    status.update(force=True, state="running", pid=os.getpid(),
                  pid_start=_process_start_ticks(os.getpid()), started=time.time(),
                  message="starting")
    try:
        spec = JobSpec.model_validate(read_json(job_dir / "spec.json"))
        kind = get_kind(spec.kind)
        params = kind.params_class.model_validate(spec.params)
        result = kind.run(params, status.progress)
        write_json_atomic(job_dir / "result.json", result)
    except JobCancelled:
        status.update(force=True, state="cancelled", finished=time.time(), message="cancelled")
        return 130
    except DeltaWorkbenchError as exc:
        status.update(force=True, state="failed", finished=time.time(), error=str(exc))
        print(f"job failed: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - every failure must end in the status file
        traceback.print_exc()
        status.update(force=True, state="failed", finished=time.time(),
                      error=f"{type(exc).__name__}: {exc}".splitlines()[0][:500])
        return 1
    status.update(force=True, state="done", progress=1.0, finished=time.time(), message="done")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m engine.jobs.worker JOB_DIR", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _raise_cancelled)
    signal.signal(signal.SIGINT, _raise_cancelled)
    sweep_all_staging()  # a worker killed before this one left its staging behind
    return run_job(Path(argv[0]))


if __name__ == "__main__":
    sys.exit(main())
