"""The ``tune`` job kind: a tune in a spawned worker with best-so-far progress per trial and a
per-trial history file; a bad range or a folder outside the allowed roots is refused at submit."""

from __future__ import annotations

import json

import pytest
import yaml

from engine.errors import ParameterError, PathNotAllowedError
from engine.jobs import JobManager, JobSpec


@pytest.fixture
def zoo_env(monkeypatch, tmp_path, quick_zoo):
    monkeypatch.setenv("DELTA_WORKBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DELTA_WORKBENCH_ZOO", str(quick_zoo))
    monkeypatch.delenv("DELTA_WORKBENCH_MODEL_ROOTS", raising=False)
    return quick_zoo / "small"


def tune_yaml(small, weight="{range: [0, 2]}"):
    return f"""merge_method: task_arithmetic
base_model: {small}/base
models:
  - model: {small}/reverse
    parameters: {{weight: {weight}}}
  - model: {small}/upper
    parameters: {{weight: {{range: [0, 2]}}}}
"""


def test_tune_job_runs_with_best_so_far_history(tmp_path, zoo_env):
    from engine import settings

    manager = JobManager(tmp_path / "jobs", gpu=False)
    out = settings.export_dir() / "tuned.yml"
    job_id = manager.submit(JobSpec(kind="tune", params={
        "recipe_yaml": tune_yaml(zoo_env), "out": str(out), "trials": 3, "sampler": "random",
        "n_per_task": 8}))
    status = manager.wait(job_id, timeout_s=600)
    job = manager.get(job_id)
    assert status.state == "done", job.log_tail()
    assert status.progress == 1.0
    result = job.result()
    assert [h["trial"] for h in result["history"]] == [0, 1, 2]
    bests = [h["best"] for h in result["history"]]
    assert bests == sorted(bests)  # best so far never falls
    assert json.loads(out.with_suffix(".history.json").read_text()) == result["history"]
    plain = yaml.safe_load(result["best_recipe_yaml"])
    assert "range" not in result["best_recipe_yaml"] and len(plain["models"]) == 2


def test_tune_job_bad_input_is_refused_at_submit(tmp_path, zoo_env):
    manager = JobManager(tmp_path / "jobs", gpu=False)
    with pytest.raises(ParameterError, match="needs lo < hi"):
        manager.submit(JobSpec(kind="tune", params={"recipe_yaml": tune_yaml(zoo_env, "{range: [2, 1]}"),
                                                    "out": str(tmp_path / "b.yml")}))
    outside = tune_yaml(zoo_env).replace(f"{zoo_env}/reverse", str(tmp_path))
    with pytest.raises(PathNotAllowedError):
        manager.submit(JobSpec(kind="tune", params={"recipe_yaml": outside, "out": str(tmp_path / "b.yml")}))
    assert manager.jobs() == []
