"""The merge lab's "Tune" section under AppTest: ticked parameters become ranges of the tune
recipe, the tune runs as a job, its best-so-far chart and trials table show, and "Use best"
loads the best trial into the what-if form."""

from __future__ import annotations

import pytest
import yaml


@pytest.fixture
def lab(open_page):
    at = open_page("pages/merge_lab.py")
    at.selectbox(key="ml_method").set_value("task_arithmetic").run()
    assert not at.exception
    return at


def test_ticked_parameters_become_ranges(lab):
    assert any("Tick at least one parameter" in i.value for i in lab.info)
    lab.checkbox(key="tune_pick.task_arithmetic.model.weight").check().run()
    assert not lab.exception
    code = next(c.value for c in lab.code if "range" in c.value)
    data = yaml.safe_load(code)
    assert data["merge_method"] == "task_arithmetic" and len(data["models"]) == 5
    assert all(m["parameters"]["weight"] == {"range": [0.0, 2.0]} for m in data["models"])


def test_tune_runs_as_a_job_and_use_best_fills_the_form(lab, tmp_path):
    lab.checkbox(key="tune_pick.task_arithmetic.model.weight").check().run()
    lab.number_input(key="tune_trials").set_value(2).run()
    lab.selectbox(key="tune_sampler").set_value("random").run()
    lab.button(key="tune_run").click().run()
    assert not lab.exception
    assert any("Queued job" in s.value for s in lab.success)
    from engine.jobs import JobManager

    manager = JobManager(tmp_path / "home" / "jobs", gpu=False)
    (job,) = manager.jobs()
    assert job.spec.kind == "tune"
    status = manager.wait(job.id, timeout_s=600)
    assert status.state == "done", manager.get(job.id).log_tail()
    lab.run()
    assert not lab.exception
    assert lab.get("plotly_chart") and lab.dataframe
    best = yaml.safe_load(manager.get(job.id).result()["best_recipe_yaml"])
    lab.button(key="tune_use_best").click().run()
    assert not lab.exception
    for i, model in enumerate(best["models"]):
        assert lab.session_state[f"ml.task_arithmetic.{i}.weight"] == pytest.approx(
            model["parameters"]["weight"])
