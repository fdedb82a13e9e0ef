"""Rows that analysis jobs recorded, loaded into the metric store by the app process.

A worker never opens the database (``engine.metric_cache.RecordingCache`` hands its rows back
as the job's result); the app process, the store's only writer, ingests each finished job
once and marks it ingested.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import DeltaWorkbenchError
from engine.metric_cache import recorded_rows

ANALYSIS_JOB_KIND = "analyze"


@dataclass
class Ingested:
    rows: int = 0
    jobs: int = 0
    warnings: list[str] = field(default_factory=list)  # one line per job whose result is unreadable


def ingest_analysis_jobs(store, manager) -> Ingested:
    """Load the rows of finished, not yet ingested analysis jobs into ``store`` and mark those
    jobs ingested (a job whose result cannot be read is marked too, with a warning). A store
    that is not writable ingests nothing (the jobs wait for the next visit)."""
    done = Ingested()
    if not getattr(store, "writable", False):
        return done
    for job in manager.jobs():
        if job.spec.kind != ANALYSIS_JOB_KIND or job.status.state != "done" or job.status.ingested:
            continue
        try:
            result = job.result() or {}
        except DeltaWorkbenchError as err:
            done.warnings.append(f"Analysis job {job.id}: its result cannot be read ({err}).")
            manager.mark_ingested(job.id)
            continue
        items = recorded_rows(result)
        count = store.put_many(items) if items else 0
        if count or not items:
            manager.mark_ingested(job.id)
            done.rows += count
            done.jobs += 1
    return done
