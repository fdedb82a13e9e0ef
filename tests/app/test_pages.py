"""Every page renders under AppTest with no exception (reliability 24)."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def workbench_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DELTA_WORKBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(ROOT)
    return tmp_path


def test_models_page_without_zoo_offers_a_build(workbench_env, monkeypatch):
    monkeypatch.setenv("DELTA_WORKBENCH_ZOO", str(workbench_env / "nozoo"))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    assert not at.exception
    assert any("Build the demo zoo" in b.label for b in at.button)


def test_models_page_lists_the_zoo_and_inspects_a_folder(workbench_env, monkeypatch, quick_zoo):
    monkeypatch.setenv("DELTA_WORKBENCH_ZOO", str(quick_zoo))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    assert not at.exception
    table = at.dataframe[0].value
    assert {"base", "finetune"} <= set(table["role"])
    first = table["path"].iloc[0]
    at.text_input(key="inspect_path").input(str(Path(quick_zoo) / first)).run()
    assert not at.exception
    assert not at.error
    assert "parameters" in at.markdown[-1].value or any("parameters" in m.value for m in at.markdown)


def test_models_page_refuses_a_path_outside_the_roots(workbench_env, monkeypatch, tmp_path):
    monkeypatch.setenv("DELTA_WORKBENCH_ZOO", str(workbench_env / "nozoo"))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    at.text_input(key="inspect_path").input("/etc").run()
    assert not at.exception
    assert at.error and "/etc" in at.error[0].value


def test_models_page_defaults_to_the_zoo_small_family_and_reports_compatibility(
        workbench_env, monkeypatch, quick_zoo):
    monkeypatch.setenv("DELTA_WORKBENCH_ZOO", str(quick_zoo))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    assert not at.exception
    selection = at.session_state["selection"]
    assert selection["base"].endswith("small/base")
    assert sorted(Path(p).name for p in selection["finetunes"]) == sorted(
        ["reverse", "upper", "shift", "sort", "increment"])
    assert any("Compatible" in s.value for s in at.success)
    # choosing the large base with small fine-tunes is reported as incompatible, not a crash
    large = str(Path(quick_zoo) / "large" / "base")
    at.selectbox(key="select_base").set_value(large)
    at.button[0].click()  # the form's submit button
    at.run()
    assert not at.exception
    assert at.session_state["selection"]["base"] == large
    assert at.error and "Not compatible" in at.error[0].value


def test_models_page_build_button_queues_a_zoo_job(workbench_env, monkeypatch):
    from engine import settings
    from engine.jobs import JobManager

    monkeypatch.setenv("DELTA_WORKBENCH_ZOO", str(workbench_env / "nozoo"))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    next(b for b in at.button if "Build the demo zoo" in b.label).click().run()
    assert not at.exception
    manager = JobManager(settings.jobs_dir(), gpu=False)
    jobs = manager.jobs()
    try:
        assert [j.spec.kind for j in jobs] == ["zoo_build"]
        assert jobs[0].spec.params["out"] == str(workbench_env / "nozoo")
    finally:
        for job in jobs:
            manager.cancel(job.id)
    assert not (workbench_env / "nozoo").exists()


def test_jobs_page_lists_a_finished_and_a_failed_job(workbench_env, quick_zoo):
    from engine import settings
    from engine.jobs import JobManager, JobSpec

    manager = JobManager(settings.jobs_dir(), gpu=False)
    good = manager.submit(JobSpec(kind="eval", title="eval reverse", params={
        "model_dir": str(Path(quick_zoo) / "small" / "reverse"), "tasks": ["reverse"],
        "n_per_task": 2}))
    bad = manager.submit(JobSpec(kind="eval", title="eval missing",
                                 params={"model_dir": str(workbench_env / "missing")}))
    manager.wait(good, 300), manager.wait(bad, 300)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.switch_page("pages/jobs.py").run()
    assert not at.exception
    assert any("done in" in s.value for s in at.success)
    assert at.error and str(workbench_env / "missing") in at.error[0].value


def test_export_page_refuses_bad_input_and_lists_exports(workbench_env, quick_zoo):
    exports = workbench_env / "home" / "exports"
    (exports / "done-model").mkdir(parents=True)
    (exports / "done-model" / "config.json").write_text("{}")
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.switch_page("pages/export.py").run()
    assert not at.exception
    assert any("done-model" in m.value for m in at.markdown)
    assert at.get("download_button")  # a small folder is offered as a zip
    at.text_area(key="export_recipe").input("merge_method: [unclosed")
    at.text_input(key="export_out_name").input("../escape")
    at.button[0].click().run()
    assert not at.exception and at.error and "plain folder name" in at.error[0].value
    at.text_input(key="export_out_name").input("new-one")
    at.button[0].click().run()
    assert not at.exception and at.error and "not valid YAML" in at.error[0].value
    assert not (exports / "new-one").exists()


def test_export_page_rebuilds_a_compressed_fine_tune_as_a_job(workbench_env, monkeypatch,
                                                              quick_zoo):
    from engine import settings

    monkeypatch.setenv("DELTA_WORKBENCH_ZOO", str(quick_zoo))
    from engine.compress import compress
    from engine.jobs import JobManager

    zoo = Path(quick_zoo)
    artifact = workbench_env / "home" / "artifacts" / "upper-svd"
    artifact.parent.mkdir(parents=True)
    compress(zoo / "small" / "base", zoo / "small" / "upper", artifact, "svd", ratio=4)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.switch_page("pages/export.py").run()
    at.text_input(key="export_artifact").input(str(artifact))
    at.text_input(key="export_base").input("/etc")
    at.text_input(key="export_rebuilt_name").input("upper-rebuilt")
    next(b for b in at.button if "Rebuild and export" in b.label).click().run()
    assert not at.exception and at.error and "/etc" in at.error[0].value
    at.text_input(key="export_base").input(str(zoo / "small" / "base"))
    next(b for b in at.button if "Rebuild and export" in b.label).click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    manager = JobManager(settings.jobs_dir(), gpu=False)
    (job,) = manager.jobs()
    assert manager.wait(job.id, timeout_s=300).state == "done", manager.get(job.id).log_tail()
    out = workbench_env / "home" / "exports" / "upper-rebuilt"
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).config.hidden_size > 0


def test_export_page_extracts_a_lora_adapter_as_a_job(workbench_env, monkeypatch, quick_zoo):
    import json

    from engine import settings
    from engine.jobs import JobManager

    monkeypatch.setenv("DELTA_WORKBENCH_ZOO", str(quick_zoo))
    zoo = Path(quick_zoo)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.switch_page("pages/export.py").run()
    # the selection's base and first fine-tune are offered
    assert at.text_input(key="export_lora_base").value == str(zoo / "small" / "base")
    at.text_input(key="export_lora_finetuned").input("/etc")
    at.text_input(key="export_lora_name").input("reverse-lora")
    at.number_input(key="export_lora_rank").set_value(4)
    at.checkbox(key="export_lora_embed").check()
    next(b for b in at.button if "Extract and export" in b.label).click().run()
    assert not at.exception and at.error and "/etc" in at.error[0].value
    at.text_input(key="export_lora_finetuned").input(str(zoo / "small" / "reverse"))
    next(b for b in at.button if "Extract and export" in b.label).click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    manager = JobManager(settings.jobs_dir(), gpu=False)
    (job,) = manager.jobs()
    assert job.spec.kind == "extract_lora"
    assert manager.wait(job.id, timeout_s=300).state == "done", manager.get(job.id).log_tail()
    out = workbench_env / "home" / "exports" / "reverse-lora"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and "model.embed_tokens" in config["target_modules"]
    assert (out / "README.md").read_text().startswith("---\n")
    at.run()  # the adapter is listed, with its card, as a zip
    assert not at.exception
    assert any("extract-lora" in c.value and "model card" in c.value for c in at.caption)
    assert any("dl-reverse-lora" in b.proto.id for b in at.get("download_button"))
