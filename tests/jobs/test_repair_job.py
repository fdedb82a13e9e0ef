"""The ``repair`` job kind: paths checked against the allowed roots and parameters validated
when the spec is built (nothing queued), and the kind's function writes the repaired model."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.errors import ParameterError, PathNotAllowedError
from engine.jobs.kinds import RepairJobParams, get_kind


@pytest.fixture
def roots(quick_zoo, tmp_path, monkeypatch):
    monkeypatch.setenv("DELTA_WORKBENCH_ZOO", str(quick_zoo))
    monkeypatch.setenv("DELTA_WORKBENCH_MODEL_ROOTS", str(tmp_path))
    return Path(quick_zoo)


def test_the_kind_runs_a_repair(roots, tmp_path):
    params = RepairJobParams(aligned=str(roots / "safety/aligned"), finetuned=str(roots / "safety/erased"),
                             method="safe_delta", out=str(tmp_path / "out"),
                             params={"budget": "fraction", "s": 0.2})
    seen = []
    result = get_kind("repair").run(params, lambda fraction, message: seen.append(fraction))
    assert result["summary"]["matrices"] == 14 and 0 < result["summary"]["kept_share"] < 1
    assert (tmp_path / "out/model.safetensors").is_file() and seen


def test_paths_outside_the_roots_and_bad_parameters_are_refused_at_submit(roots, tmp_path):
    with pytest.raises(PathNotAllowedError):
        RepairJobParams(aligned="/etc", finetuned=str(roots / "safety/erased"), method="irr",
                        out=str(tmp_path / "o"))
    with pytest.raises(ParameterError, match="keep_conflicting"):
        RepairJobParams(aligned=str(roots / "safety/aligned"), finetuned=str(roots / "safety/erased"),
                        method="irr", out=str(tmp_path / "o"), params={"keep_conflicting": 2})
    assert not (tmp_path / "o").exists()
