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
