"""Background jobs: heavy work in spawned worker processes, tracked on disk.

A job is a folder under the jobs root holding ``spec.json`` (what to run), ``status.json``
(state, progress, message; rewritten atomically by the worker), ``log.txt`` (the worker's
stdout and stderr) and, once done, ``result.json``. State lives on disk, not in the app's
memory, so a job survives a page reload and even a restart of the app.
"""

from engine.jobs.manager import JobManager, JobRecord
from engine.jobs.spec import JOB_STATES, JobSpec, JobStatus

__all__ = ["JOB_STATES", "JobManager", "JobRecord", "JobSpec", "JobStatus"]
