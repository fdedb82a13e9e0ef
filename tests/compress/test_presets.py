"""Presets: named parameter sets of a method that the bench measured. Every preset is valid,
reaches the CLI, and is one of the rows bench/compress_quality.py measures by default (so the
table in bench/README.md speaks for what we ship)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from engine.__main__ import main
from engine.compress import get_method, list_methods
from engine.errors import ParameterError

REPO = Path(__file__).resolve().parents[2]


def _bench_rows() -> list[tuple[str, dict]]:
    spec = importlib.util.spec_from_file_location("compress_quality", REPO / "bench" / "compress_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [module.parse_method(label) for label in module.DEFAULT_METHODS]


def test_every_preset_is_valid_and_measured_by_the_bench():
    rows = _bench_rows()
    seen = 0
    for name in list_methods():
        method = get_method(name)
        for preset, values in method.presets.items():
            method.parse_params(values, 16.0)  # valid with a ratio
            normal = json.loads(json.dumps(values))
            assert (name, normal) in [(n, json.loads(json.dumps(p))) for n, p in rows], (name, preset)
            seen += 1
    assert seen >= 4


def test_unknown_preset_is_refused_naming_the_known_ones():
    with pytest.raises(ParameterError, match="small-models"):
        get_method("delta_dct").preset("nope")
    with pytest.raises(ParameterError, match="none"):
        get_method("dare").preset("small-models")


def test_cli_preset_sets_the_parameters_and_param_overrides_it(tmp_path, capsys):
    from tests.compress.helpers import make_pair

    base, ft, _, _ = make_pair(tmp_path / "pair")
    code = main(["compress", "--base", str(base), "--finetuned", str(ft), "--method", "delta_dct",
                 "--ratio", "8", "--preset", "small-models", "--param", "patch_size=16",
                 "--out", str(tmp_path / "art"), "--json", "--quiet"])
    assert code == 0
    params = json.loads(capsys.readouterr().out)["params"]
    assert params["rescale"] == "projection" and params["patch_size"] == 16
    code = main(["compress", "--base", str(base), "--finetuned", str(ft), "--method", "dare",
                 "--ratio", "8", "--preset", "small-models", "--out", str(tmp_path / "art2")])
    err = capsys.readouterr().err
    assert code == 2 and "unknown preset" in err and not (tmp_path / "art2").exists()
