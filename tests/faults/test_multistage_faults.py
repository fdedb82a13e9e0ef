"""Issue 12, item 5: bad multi-stage recipes (mergekit-multi's format) through `python -m engine
merge`: no final merge, two of them, two merges of one name, merges using each other in a loop,
a stage naming a folder that does not exist, a stage that is no recipe. Each is refused before
any merge runs: exit 2, one line naming the merge and the key, nothing written."""

from __future__ import annotations

import pytest
import yaml

from engine.__main__ import main
from tests.io.builders import snapshot, tiny_tensors, write_model


@pytest.fixture
def models(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTA_WORKBENCH_HOME", str(tmp_path / "home"))
    return {n: write_model(tmp_path / "models" / n, tiny_tensors(seed=i)) for i, n in enumerate("ab")}


def linear(name, *refs):
    doc = {"merge_method": "linear", "models": [{"model": r, "parameters": {"weight": 1.0}} for r in refs]}
    return {"name": name, **doc} if name else doc


CASES = {
    "no final merge": (lambda m: [linear("one", str(m["a"]), str(m["b"])), linear("two", "one", str(m["a"]))],
                       ["no final merge"]),
    "two final merges": (lambda m: [linear(None, str(m["a"]), str(m["b"])), linear(None, str(m["b"]), str(m["a"]))],
                         ["two final merges"]),
    "two merges of one name": (lambda m: [linear("one", str(m["a"]), str(m["b"])),
                                          linear("one", str(m["b"]), str(m["a"])), linear(None, "one", str(m["a"]))],
                               ["two merges named 'one'"]),
    "a loop": (lambda m: [linear("one", "two", str(m["a"])), linear("two", "one", str(m["b"])),
                          linear(None, "one", "two")],
               ["loop", "one -> two -> one"]),
    "a missing folder in a stage": (lambda m: [linear("one", str(m["a"]), str(m["a"].parent / "nope")),
                                               linear(None, "one", str(m["b"]))],
                                    ["one: models[1].model", "no such local model folder"]),
    "a stage that is no recipe": (lambda m: [{"name": "one", "merge_method": "linear"},
                                             linear(None, "one", str(m["b"]))],
                                  ["(one)", "give exactly one of 'models' or 'slices'"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_multistage_recipe_is_refused_before_any_merge(models, tmp_path, capsys, case):
    build, needles = CASES[case]
    path = tmp_path / "multi.yml"
    path.write_text(yaml.safe_dump_all(build(models), sort_keys=False))
    before = snapshot(tmp_path)
    code = main(["merge", str(path), "--out", str(tmp_path / "out"), "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    assert snapshot(tmp_path) == before
