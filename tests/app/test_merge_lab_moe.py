"""The merge lab's "Assemble an MoE" section under AppTest: prompts prefilled from each
expert's zoo task, the config is mergekit-moe YAML, a bad choice is a message, and the
assembly runs as a job into the export folder."""

from __future__ import annotations

import json

import pytest


@pytest.fixture
def lab(open_page):
    return open_page("pages/merge_lab.py")


def test_prompts_come_from_the_experts_zoo_tasks(lab, quick_zoo):
    reverse = str(quick_zoo / "small" / "reverse")
    area = lab.text_area(key=f"moe_prompts.{reverse}")
    lines = area.value.splitlines()
    assert len(lines) == 8 and all(line.startswith("rev:") and line.endswith("=") for line in lines)
    experts = lab.multiselect(key="moe_experts").value
    assert len(experts) == 5 and reverse in experts  # the selection's fine-tunes


def test_an_expert_without_prompts_is_a_message(lab, quick_zoo):
    lab.selectbox(key="moe_gate_mode").set_value("cheap_embed").run()
    lab.text_area(key=f"moe_prompts.{quick_zoo / 'small' / 'upper'}").input("").run()
    assert not lab.exception
    assert any("positive_prompts" in e.value for e in lab.error)


def test_the_moe_runs_as_a_job(lab, tmp_path):
    lab.text_input(key="moe_out_name").input("lab-moe")
    next(b for b in lab.button if "Assemble the MoE" in b.label).click().run()
    assert not lab.exception
    assert any("Queued job" in s.value for s in lab.success)
    from engine.jobs import JobManager

    manager = JobManager(tmp_path / "home" / "jobs", gpu=False)
    (job,) = manager.jobs()
    status = manager.wait(job.id, timeout_s=600)
    assert status.state == "done", manager.get(job.id).log_tail()
    out = tmp_path / "home" / "exports" / "lab-moe"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 5
    assert (out / "moe_config.yml").is_file()
