"""The Models page on a zoo still being built: the published models, what is still training,
and a button that continues an interrupted build as a resume job."""

from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

from engine.zoo.plan import zoo_plan
from tests.zoo.partial import partial_zoo

ROOT = Path(__file__).resolve().parents[2]


def test_models_page_continues_an_interrupted_build(monkeypatch, tmp_path, quick_zoo):
    from engine import settings
    from engine.jobs import JobManager

    zoo = partial_zoo(quick_zoo, tmp_path / "zoo", families=("small", "large"))
    monkeypatch.setenv("DELTA_WORKBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DELTA_WORKBENCH_ZOO", str(zoo))
    monkeypatch.chdir(ROOT)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    assert not at.exception
    assert set(at.dataframe[0].value["family"]) == {"small", "large"}
    training = [m.path for m in zoo_plan(quick=True) if m.family not in ("small", "large")]
    assert {"safety/aligned", "safety/erased", "safety/unaligned", "safety/benign"} <= set(training)
    assert any(f"Still training: {len(training)} model(s) ({', '.join(training)})" in i.value
               for i in at.info)
    next(b for b in at.button if "Continue the zoo build" in b.label).click().run()
    assert not at.exception
    manager = JobManager(settings.jobs_dir(), gpu=False)
    jobs = manager.jobs()
    try:
        assert [j.spec.kind for j in jobs] == ["zoo_build"]
        assert jobs[0].spec.params == {"out": str(zoo), "resume": True, "quick": True, "seed": 0}
        assert not any("Continue the zoo build" in b.label for b in at.button)  # one at a time
    finally:
        for job in jobs:
            manager.cancel(job.id)
