"""The ``transfer`` job kind: paths and parameters checked at submit, the kind's function writes
the transferred model and returns the accuracies."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.errors import ParameterError, PathNotAllowedError
from engine.jobs.kinds import TransferJobParams, get_kind


@pytest.fixture
def roots(quick_zoo, tmp_path, monkeypatch):
    monkeypatch.setenv("DELTA_WORKBENCH_ZOO", str(quick_zoo))
    monkeypatch.setenv("DELTA_WORKBENCH_MODEL_ROOTS", str(tmp_path))
    return Path(quick_zoo)


def _spec(roots, tmp_path, **kw):
    base = dict(method="laten", source=str(roots / "large/reverse"), source_base=str(roots / "large/base"),
                target=str(roots / "small/base"), task="reverse", out=str(tmp_path / "out"),
                params={"n_extract": 2, "n_align": 4, "align_per_step": 1}, n_eval=4, baselines=False)
    return TransferJobParams(**{**base, **kw})


def test_the_kind_runs_a_transfer(roots, tmp_path):
    seen = []
    result = get_kind("transfer").run(_spec(roots, tmp_path), lambda f, m: seen.append(f))
    assert set(result["accuracy"]) == {"target_base", "transferred"}
    assert (tmp_path / "out/model.safetensors").is_file() and seen


def test_bad_paths_methods_tasks_and_parameters_are_refused_at_submit(roots, tmp_path):
    with pytest.raises(PathNotAllowedError):
        _spec(roots, tmp_path, source="/etc")
    with pytest.raises(ParameterError, match="unknown transfer method"):
        _spec(roots, tmp_path, method="magic")
    with pytest.raises(ParameterError, match="unknown task"):
        _spec(roots, tmp_path, task="nope")
    with pytest.raises(ParameterError, match="rank"):
        _spec(roots, tmp_path, method="postpkt", params={"rank": 0})
    assert not (tmp_path / "out").exists()
