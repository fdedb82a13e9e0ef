"""Fixtures of the app tests: a workbench home of the test's own over the quick zoo."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def open_page(monkeypatch, tmp_path, quick_zoo):
    """``open_page("pages/x.py")``: the app run once on that page (home under ``tmp_path``,
    the quick zoo as the zoo), checked to have raised nothing."""
    monkeypatch.setenv("DELTA_WORKBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DELTA_WORKBENCH_ZOO", str(quick_zoo))
    monkeypatch.chdir(ROOT)

    def run(page: str) -> AppTest:
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
        at.switch_page(page).run()
        assert not at.exception
        return at

    return run
