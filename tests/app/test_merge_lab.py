"""Merge lab under AppTest: renders from the quick zoo, a weight change re-scores, runs are
kept, the recipe is valid mergekit YAML, and a full merge is queued as a job."""

from __future__ import annotations

import pytest
import yaml


@pytest.fixture
def lab(open_page):
    return open_page("pages/merge_lab.py")


def test_merge_lab_scores_a_merge_and_reacts_to_a_weight(lab):
    assert not lab.error
    assert lab.session_state["ml_method"] == "ties"
    recipe = yaml.safe_load(lab.code[-1].value)
    assert recipe["merge_method"] == "ties" and len(recipe["models"]) == 5
    assert all(m["parameters"]["weight"] == 1.0 for m in recipe["models"])
    weight = lab.number_input(key="ml.ties.0.weight")
    weight.set_value(0.0).run()
    assert not lab.exception and not lab.error
    recipe = yaml.safe_load(lab.code[-1].value)
    assert recipe["models"][0]["parameters"]["weight"] == 0.0
    assert len(lab.get("plotly_chart")) >= 1


def test_merge_lab_keeps_runs_and_switches_method(lab):
    lab.button(key="ml_keep").click().run()
    assert len(lab.session_state["merge_runs"]) == 1
    lab.selectbox(key="ml_method").set_value("linear").run()
    assert not lab.exception and not lab.error
    recipe = yaml.safe_load(lab.code[-1].value)
    assert recipe["merge_method"] == "linear"
    assert recipe["models"][0]["parameters"]["weight"] == pytest.approx(0.2)
    lab.button(key="ml_keep").click().run()
    runs = lab.session_state["merge_runs"]
    assert [r["method"] for r in runs] == ["ties", "linear"]
    assert set(runs[0]["accuracy"]) == set(runs[1]["accuracy"])


def test_merge_lab_invalid_parameter_is_a_message_not_a_crash(lab):
    lab.selectbox(key="ml_method").set_value("slerp").run()
    assert not lab.exception
    assert any("merges at most 1 fine-tune" in i.value and "only the first selected" in i.value
               for i in lab.info)
    lab.selectbox(key="ml_method").set_value("channel_merging").run()
    lab.number_input(key="ml.channel_merging.num_groups").set_value(50).run()
    assert not lab.exception


def test_merge_lab_queues_the_full_merge(lab, tmp_path):
    lab.text_input(key="ml_out_name").input("lab-out")
    next(b for b in lab.button if "Run the full merge" in b.label).click().run()
    assert not lab.exception
    assert any("Queued job" in s.value for s in lab.success)
    from engine.jobs import JobManager

    manager = JobManager(tmp_path / "home" / "jobs", gpu=False)
    (job,) = manager.jobs()
    status = manager.wait(job.id, timeout_s=300)
    assert status.state == "done", manager.get(job.id).log_tail()
    out = tmp_path / "home" / "exports" / "lab-out"
    assert (out / "config.json").is_file() and (out / "merge_recipe.yml").is_file()


def test_every_merge_method_runs_with_its_form_defaults(lab):
    """Each method of the registry, as its pydantic form renders it, merges and scores the
    quick zoo's fine-tunes without an error (a form that cannot express a parameter type is
    caught here, not by a user)."""
    from engine.merge import list_methods

    names = [m if isinstance(m, str) else m.name for m in list_methods()]
    assert len(names) >= 18
    failures = {}
    for name in names:
        lab.selectbox(key="ml_method").set_value(name).run(timeout=60)
        if lab.exception or lab.error:
            failures[name] = [e.value for e in lab.exception] + [e.value for e in lab.error]
            continue
        recipe = yaml.safe_load(lab.code[-1].value)
        assert recipe["merge_method"] == name
    assert not failures, failures


def test_merge_lab_sweeps_lambda_and_a_per_model_weight(lab):
    """The sweep merges at nine values and plots them; lambda = 1 with weights 1 and weight = 1
    with lambda 1 are the same merge, so both sweeps score it the same."""
    lab.selectbox(key="ml_method").set_value("task_arithmetic").run()
    assert not lab.exception and not lab.error
    lab.selectbox(key="ml_sweep_param.task_arithmetic").set_value("lambda").run()
    lab.button(key="ml_sweep_run").click().run(timeout=180)
    assert not lab.exception and not lab.error
    rows = lab.session_state["ml_sweep.task_arithmetic.lambda"]
    assert len(rows) == 9 and rows[0]["value"] != rows[-1]["value"]
    chart_keys = [c.proto.id for c in lab.get("plotly_chart")]
    assert any("ml_sweep_chart" in k for k in chart_keys)
    lab.selectbox(key="ml_sweep_param.task_arithmetic").set_value("weight (every model)").run()
    lab.button(key="ml_sweep_run").click().run(timeout=180)
    assert not lab.exception and not lab.error
    by_weight = lab.session_state["ml_sweep.task_arithmetic.weight (every model)"]
    assert [r["value"] for r in by_weight][:2] == [0.1, 0.25]
    at_one = [r for r in rows if r["value"] == 1.0]
    assert at_one and at_one[0] == next(r for r in by_weight if r["value"] == 1.0)
