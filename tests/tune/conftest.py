import pytest


@pytest.fixture(autouse=True)
def tune_home(tmp_path, monkeypatch):
    """Each test's studies live in its own workbench home."""
    home = tmp_path / "home"
    monkeypatch.setenv("DELTA_WORKBENCH_HOME", str(home))
    return home
