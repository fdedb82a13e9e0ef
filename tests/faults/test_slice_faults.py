"""Issue 12, item 2: bad layer stacks (frankenmerge `slices`) through `python -m engine merge`:
a layer range out of a model or not a range, sources of one slice of different lengths, no slices
or no sources, a slice without its method's base, a passthrough slice of two sources, a source
lacking a layer tensor. Each is refused before any work: exit 2, one line on stderr naming the
recipe key (and the model), nothing written."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml

from engine.__main__ import main
from tests.io.builders import TINY_CONFIG, snapshot, tiny_tensors, write_model


@pytest.fixture
def models(tmp_path) -> dict[str, Path]:
    out = {}
    for i, (name, layers) in enumerate((("a", 4), ("b", 4), ("short", 2))):
        out[name] = write_model(tmp_path / "models" / name, tiny_tensors(seed=i, layers=layers),
                                {**TINY_CONFIG, "num_hidden_layers": layers})
    tensors = tiny_tensors(seed=5, layers=4)
    del tensors["model.layers.2.mlp.up_proj.weight"]
    out["holey"] = write_model(tmp_path / "models" / "holey", tensors, {**TINY_CONFIG, "num_hidden_layers": 4})
    return out


def src(models, name, lo, hi):
    return {"model": str(models[name]), "layer_range": [lo, hi]}


def stack(models, *slices, method="passthrough", **extra):
    return {"merge_method": method, "slices": [{"sources": [src(models, *s) for s in piece]}
                                               for piece in slices], **extra}


CASES = {
    "end beyond the model": (lambda m: stack(m, [("a", 0, 2)], [("short", 1, 3)]),
                             ["recipe key slices[1].sources[0].layer_range", "[1, 3]",
                              "beyond the model's 2 layers", "short"]),
    "end before start": (lambda m: stack(m, [("a", 3, 1)]),
                         ["recipe key slices[0].sources[0].layer_range", "[3, 1]", "not a layer range"]),
    "empty range": (lambda m: stack(m, [("a", 0, 2)], [("b", 2, 2)]),
                    ["recipe key slices[1].sources[0].layer_range", "[2, 2]", "not a layer range"]),
    "negative start": (lambda m: stack(m, [("a", -1, 2)]),
                       ["recipe key slices[0].sources[0].layer_range", "[-1, 2]"]),
    "different lengths in one slice": (
        lambda m: stack(m, [("a", 0, 2), ("b", 0, 3)], method="linear"),
        ["recipe key slices[0].sources", "same number of layers", "[2, 3]", str(Path("models") / "a"),
         str(Path("models") / "b")]),
    "no slices": (lambda m: {"merge_method": "passthrough", "slices": []},
                  ["slices", "at least 1 item"]),
    "a slice without sources": (lambda m: {"merge_method": "passthrough", "slices": [{"sources": []}]},
                                ["slices.0.sources", "at least 1 item"]),
    "passthrough of two sources": (lambda m: stack(m, [("a", 0, 2), ("b", 1, 3)]),
                                   ["recipe key slices[0]", "passthrough takes exactly 1 input"]),
    "base not among the sources": (
        lambda m: stack(m, [("a", 0, 2), ("b", 1, 3)], method="task_arithmetic",
                        base_model=str(m["short"])),
        ["recipe key slices[0].sources", "task_arithmetic needs the base model", "short"]),
    "a method needing a base, none given": (
        lambda m: stack(m, [("a", 0, 2), ("b", 1, 3)], method="ties"),
        ["recipe key slices[0]", "ties needs a base_model"]),
    "a source lacking a layer tensor": (
        lambda m: stack(m, [("a", 0, 1)], [("holey", 1, 4)]),
        ["recipe key slices[1].sources[0]", "model.layers.2.mlp.up_proj.weight", "holey"]),
    "a typo in a slice's parameters": (
        lambda m: {**stack(m, [("a", 0, 2), ("b", 0, 2)], method="linear"),
                   "slices": [{"sources": [src(m, "a", 0, 2), src(m, "b", 0, 2)],
                               "parameters": {"wieght": 1.0}}]},
        ["recipe key slices[0]", "unknown parameter 'wieght'"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_layer_stack_is_refused_in_one_line_naming_the_key(models, tmp_path, capsys, case):
    build, needles = CASES[case]
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(build(models)))
    out = tmp_path / "out" / "merged"
    before = snapshot(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["merge", str(path), "--out", str(out), "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    assert snapshot(tmp_path) == before and not out.exists()


def test_overlapping_ranges_of_one_model_are_a_self_merge_not_an_error(models, tmp_path, capsys):
    """mergekit accepts them, and self-merges are built from them: layers 1-2 appear twice."""
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(stack(models, [("a", 0, 3)], [("a", 1, 4)])))
    code = main(["merge", str(path), "--out", str(tmp_path / "out"), "--quiet", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert '"num_hidden_layers": 6' in (tmp_path / "out" / "config.json").read_text()
