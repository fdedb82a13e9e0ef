"""Analysis jobs as the app uses them: submitted with normalised parameters, found again by
those parameters, and their recorded metric rows loaded into the store by the app process.

A worker never opens the database (``engine.metric_cache.RecordingCache`` hands its rows back
as the job's result); the app process, the store's only writer, ingests each finished job
once and marks it ingested.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import DeltaWorkbenchError
from engine.metric_cache import recorded_rows

ANALYSIS_JOB_KIND = "analyze"


def normal_params(params: dict) -> dict:
    """The job's parameters as the job kind validates and stores them (so equal requests
    compare equal)."""
    from engine.jobs.kinds import AnalyzeJobParams

    return AnalyzeJobParams.model_validate(params).model_dump(mode="json")


def matching_job(manager, params: dict):
    """The newest analysis job for exactly these parameters, or None."""
    wanted = normal_params(params)
    for job in manager.jobs():  # newest first
        if job.spec.kind != ANALYSIS_JOB_KIND:
            continue
        try:
            if normal_params(job.spec.params) == wanted:
                return job
        except ValueError:
            continue
    return None


def submit_analysis_job(manager, params: dict, title: str) -> str:
    """Queue an analysis job; its id."""
    from engine.jobs.spec import JobSpec

    return manager.submit(JobSpec(kind=ANALYSIS_JOB_KIND, title=title, params=normal_params(params)))


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
