"""The ``moe`` job kind: a mergekit-moe config assembled in a spawned worker with progress;
a config naming a folder outside the allowed roots is refused at submit, nothing queued."""

from __future__ import annotations

import json

import pytest
import yaml

from engine.errors import PathNotAllowedError
from engine.jobs import JobManager, JobSpec
from tests.moe.builders import moe_config


@pytest.fixture
def zoo_env(monkeypatch, tmp_path, quick_zoo):
    monkeypatch.setenv("DELTA_WORKBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DELTA_WORKBENCH_ZOO", str(quick_zoo))
    monkeypatch.delenv("DELTA_WORKBENCH_MODEL_ROOTS", raising=False)
    small = quick_zoo / "small"
    return {"base": small / "base", "e0": small / "reverse", "e1": small / "upper", "e2": small / "sort"}


def test_moe_job_runs_and_reports(tmp_path, zoo_env):
    from engine import settings

    manager = JobManager(tmp_path / "jobs", gpu=False)
    out = settings.export_dir() / "moe"
    spec = JobSpec(kind="moe", params={"config_yaml": yaml.safe_dump(moe_config(zoo_env, gate_mode="hidden")),
                                       "out": str(out)})
    job_id = manager.submit(spec)
    status = manager.wait(job_id, timeout_s=600)
    job = manager.get(job_id)
    assert status.state == "done", job.log_tail()
    assert status.progress == 1.0
    result = job.result()
    assert result["architecture"] == "Mixtral" and result["experts"] == 3
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 3


def test_moe_job_outside_the_allowed_roots_is_refused_at_submit(tmp_path, zoo_env):
    manager = JobManager(tmp_path / "jobs", gpu=False)
    config = moe_config(zoo_env)
    config["experts"][2]["source_model"] = str(tmp_path)
    with pytest.raises(PathNotAllowedError) as info:
        manager.submit(JobSpec(kind="moe", params={"config_yaml": yaml.safe_dump(config),
                                                   "out": str(tmp_path / "out")}))
    assert "experts[2].source_model" in str(info.value)
    assert manager.jobs() == []
