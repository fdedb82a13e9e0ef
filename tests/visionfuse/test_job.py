"""The ``visionfuse`` job kind: paths and parameters checked when the spec is built, and the
kind's function writes the fused folder."""

import pytest

from engine.errors import ParameterError, PathNotAllowedError
from engine.jobs.kinds import VisionFuseJobParams, get_kind


@pytest.fixture
def roots(members, tmp_path, monkeypatch):
    monkeypatch.setenv("DELTA_WORKBENCH_ZOO", str(members["base"].parents[1]))
    monkeypatch.setenv("DELTA_WORKBENCH_MODEL_ROOTS", f"{tmp_path}:{members['top'].parent}")
    return members


def test_the_kind_fuses(roots, tmp_path):
    params = VisionFuseJobParams(base=str(roots["base"]), models=[str(roots["top"]),
                                 str(roots["bottom"])], out=str(tmp_path / "out"))
    seen = []
    result = get_kind("visionfuse").run(params, lambda f, m: seen.append(f))
    assert result["members"] == ["top", "bottom"] and result["visual_tokens"] == 25
    assert (tmp_path / "out/visionfuse.json").is_file() and seen == [0.0, 1.0]


def test_bad_specs_are_refused_at_submit(roots, tmp_path):
    with pytest.raises(PathNotAllowedError):
        VisionFuseJobParams(base="/etc", models=[str(roots["top"]), str(roots["bottom"])],
                            out=str(tmp_path / "o"))
    with pytest.raises(ParameterError, match="2 members"):
        VisionFuseJobParams(base=str(roots["base"]), models=[str(roots["top"]),
                            str(roots["bottom"])], out=str(tmp_path / "o"), weights=[1.0])
    with pytest.raises(ParameterError):
        VisionFuseJobParams(base=str(roots["base"]), models=[str(roots["top"]),
                            str(roots["bottom"])], out=str(tmp_path / "o"), method="ties",
                            params={"density": 7})
    assert not (tmp_path / "o").exists()
