"""Seconds spent per stage of a job (read, convert, merge, write, hash, verify, fsync, ...).

Cheap ``perf_counter`` sums, safe to add to from several threads (the reader, the merge and the
writer threads each time their own stages). Stages that run on different threads overlap, so
their sums may add up to more than the wall time: the largest one is the bottleneck. Waits of
one stage for another are recorded as stages too (``wait_read``, ``wait_write``). Beside the
wall seconds, the CPU seconds of the thread that ran each stage are summed: on a loaded
machine a stage's wall time includes time its thread waited for a core, its CPU time does not.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager


class StageTimes:
    """Accumulated seconds and call counts per stage name."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}
        self._cpu: dict[str, float] = {}
        self._calls: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float, cpu_seconds: float = 0.0) -> None:
        with self._lock:
            self._seconds[stage] = self._seconds.get(stage, 0.0) + seconds
            self._cpu[stage] = self._cpu.get(stage, 0.0) + cpu_seconds
            self._calls[stage] = self._calls.get(stage, 0) + 1

    @contextmanager
    def stage(self, name: str):
        started, cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started, time.thread_time() - cpu)

    def seconds(self) -> dict[str, float]:
        """{stage: seconds}, rounded to the millisecond, in the order stages first ran."""
        with self._lock:
            return {name: round(value, 3) for name, value in self._seconds.items()}

    def cpu_seconds(self) -> dict[str, float]:
        """{stage: CPU seconds of the threads that ran it}, rounded to the millisecond."""
        with self._lock:
            return {name: round(value, 3) for name, value in self._cpu.items()}

    def calls(self) -> dict[str, int]:
        with self._lock:
            return dict(self._calls)


__all__ = ["StageTimes"]
