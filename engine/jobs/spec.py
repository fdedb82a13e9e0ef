"""What a job is: its spec (kind + parameters) and the status a worker reports."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.errors import ConfigError
from engine.io.staging import write_file_atomic

JobState = Literal["queued", "running", "done", "failed", "cancelled"]
JOB_STATES: tuple[str, ...] = ("queued", "running", "done", "failed", "cancelled")
FINAL_STATES = frozenset({"done", "failed", "cancelled"})


class JobSpec(BaseModel):
    """One unit of heavy work: a registered ``kind`` (see ``engine.jobs.kinds``) and its
    parameters, checked by the kind's own params class before the job is queued."""

    model_config = ConfigDict(extra="forbid")

    kind: str
    params: dict[str, Any] = Field(default_factory=dict)
    title: str = ""
    uses_gpu: bool = False  # set by the manager: at most one GPU job runs at a time


class JobStatus(BaseModel):
    model_config = ConfigDict(extra="ignore")

    state: JobState = "queued"
    progress: float = 0.0  # 0..1
    message: str = ""
    error: str | None = None  # one line for the user; the traceback stays in log.txt
    pid: int | None = None
    pid_start: int | None = None  # /proc start ticks of pid: a recycled pid is not ours
    submitted: float = Field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    ingested: bool = False  # results loaded into the metric cache by the app process

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON so a reader sees the old file or the new one, never half."""
    write_file_atomic(path, json.dumps(data, indent=1))


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read job file: {exc}", path=path) from None
    except RecursionError:  # a damaged or hand-edited file must stay a one-line error
        raise ConfigError("cannot read job file: nested too deeply", path=path) from None
