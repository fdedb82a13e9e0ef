"""engine/settings.py: the one in-process size limit every page reads."""

from __future__ import annotations

import pytest

from engine import settings
from engine.errors import ConfigError


def test_in_process_limit_default_and_override(monkeypatch):
    monkeypatch.delenv(settings.IN_PROCESS_MAX_PARAMS_ENV, raising=False)
    assert settings.in_process_max_params() == 50_000_000
    monkeypatch.setenv(settings.IN_PROCESS_MAX_PARAMS_ENV, "1_000")
    assert settings.in_process_max_params() == 1000
    monkeypatch.setenv(settings.IN_PROCESS_MAX_PARAMS_ENV, "0")
    assert settings.in_process_max_params() == 0  # every model runs as a job


@pytest.mark.parametrize("raw", ["many", "-5", "1e9"])
def test_in_process_limit_refuses_what_is_not_a_count(monkeypatch, raw):
    monkeypatch.setenv(settings.IN_PROCESS_MAX_PARAMS_ENV, raw)
    with pytest.raises(ConfigError, match=f"DELTA_WORKBENCH_IN_PROCESS_MAX_PARAMS={raw!r}"):
        settings.in_process_max_params()


def test_no_page_keeps_its_own_size_limit():
    from pathlib import Path

    pages = Path(__file__).resolve().parents[1] / "pages"
    for page in pages.glob("*.py"):
        text = page.read_text()
        assert "50_000_000" not in text and "IN_PROCESS_LIMIT" not in text, page.name
