"""The served configuration: loopback only, XSRF/CORS on, small upload limit (reliability 25)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_streamlit_config_is_locked_down():
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    server = config["server"]
    assert server["address"] == "127.0.0.1"
    assert server["enableXsrfProtection"] is True
    assert server["enableCORS"] is True
    assert 0 < server["maxUploadSize"] <= 16
    assert config["browser"]["gatherUsageStats"] is False


def test_requirements_pin_cpu_torch():
    lines = [l.strip() for l in (ROOT / "requirements.txt").read_text().splitlines()]
    torch_lines = [l for l in lines if l.lower().startswith("torch")]
    assert torch_lines == ["torch==2.13.0"]
