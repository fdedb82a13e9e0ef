"""Multi-stage recipes (mergekit-multi's format): the final merge of a two-stage recipe equals
the same two merges run one after the other by hand; intermediates are removed; a later stage
that fails leaves nothing behind."""

from __future__ import annotations

import warnings

import pytest
import torch
import yaml

from engine.__main__ import main
from engine.merge.executor import run_merge
from engine.recipe import parse_recipe
from tests.io.builders import snapshot, tiny_tensors, write_model
from tests.merge.test_mergekit_methods import load_tensors


@pytest.fixture
def models(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTA_WORKBENCH_HOME", str(tmp_path / "home"))
    return {n: write_model(tmp_path / "models" / n, tiny_tensors(seed=i)) for i, n in enumerate("xabc")}


def stages(m, final_extra=None):
    first = {"name": "soup", "merge_method": "linear", "dtype": "float32",
             "models": [{"model": str(m["a"]), "parameters": {"weight": 0.3}},
                        {"model": str(m["b"]), "parameters": {"weight": 0.7}}]}
    final = {"merge_method": "task_arithmetic", "base_model": str(m["x"]), "dtype": "float32",
             "models": [{"model": "soup", "parameters": {"weight": 0.6}},
                        {"model": str(m["c"]), "parameters": {"weight": 0.4}}], **(final_extra or {})}
    return [final, first]  # the final merge first: the order to run them comes from the names


def write_stream(path, docs):
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def test_two_stages_equal_the_two_merges_by_hand(models, tmp_path, capsys):
    docs = stages(models)
    path = write_stream(tmp_path / "multi.yml", docs)
    code = main(["merge", str(path), "--out", str(tmp_path / "out"), "--quiet", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert "soup" in capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = {k: v for k, v in docs[1].items() if k != "name"}
        mid = run_merge(parse_recipe(first), tmp_path / "by_hand" / "soup").out
        final = dict(docs[0], models=[{"model": str(mid), "parameters": {"weight": 0.6}}, docs[0]["models"][1]])
        want = load_tensors(run_merge(parse_recipe(final), tmp_path / "by_hand" / "final").out)
    got = load_tensors(tmp_path / "out")
    assert sorted(got) == sorted(want) and all(torch.equal(got[n], want[n]) for n in got)
    scratch = tmp_path / "home" / "scratch"
    assert not scratch.exists() or not any(scratch.iterdir())  # the intermediate is gone


def test_a_failing_final_stage_leaves_nothing(models, tmp_path, capsys):
    bad = write_model(tmp_path / "models" / "wide", tiny_tensors(seed=9, hidden=16))
    docs = stages(models)
    docs[0]["models"][1]["model"] = str(bad)  # another hidden size: refused at the final stage
    path = write_stream(tmp_path / "multi.yml", docs)
    before = snapshot(tmp_path / "models")
    code = main(["merge", str(path), "--out", str(tmp_path / "out"), "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "wide" in err, err
    assert not (tmp_path / "out").exists() and snapshot(tmp_path / "models") == before
    scratch = tmp_path / "home" / "scratch"
    assert not scratch.exists() or not any(scratch.iterdir())
