"""The Neural incompatibility page's Transfer section under AppTest: a LaTen transfer of the
quick zoo runs as a job, and its accuracies (target base, transferred, control, plain
fine-tune) then show; a name that exists is refused in one line."""

from __future__ import annotations

from engine.jobs import JobManager


def test_a_transfer_runs_as_a_job_and_its_results_show(open_page, tmp_path):
    page = open_page("pages/incompatibility.py")
    assert not page.error
    assert any(s.value == "Transfer" for s in page.subheader)
    assert any("No finished transfer" in i.value for i in page.info)
    page.selectbox(key="tr_method").set_value("laten").run()
    page.text_input(key="tr_out_name").input("tr-laten")
    next(b for b in page.button if "Run the transfer" in b.label).click().run()
    assert not page.exception
    assert any("Queued job" in s.value for s in page.success)
    manager = JobManager(tmp_path / "home" / "jobs", gpu=False)
    (job,) = manager.jobs()
    status = manager.wait(job.id, timeout_s=600)
    assert status.state == "done", manager.get(job.id).log_tail()
    assert (tmp_path / "home" / "exports" / "tr-laten" / "model.safetensors").is_file()
    page.run()
    assert not page.exception and not page.error
    charts = page.get("plotly_chart")
    assert any("laten on reverse: accuracy" in c.proto.spec for c in charts)
    import json

    spec = next(json.loads(c.proto.spec) for c in charts if "laten on reverse" in c.proto.spec)
    assert spec["data"][0]["x"] == ["target base", "transferred", "control", "plain fine-tune (same steps)"]
    page.text_input(key="tr_out_name").input("tr-laten")
    next(b for b in page.button if "Run the transfer" in b.label).click().run()
    assert page.error and "already exists" in page.error[0].value
