"""``python -m engine methods``: every registered method listed, JSON equal to the registries'
describe(), full parameter listing with presets, one-line errors."""

from __future__ import annotations

import json

from engine.__main__ import main
from engine.compress import get_method as get_compressor
from engine.compress import list_methods as compressors
from engine.merge import get_method as get_merge
from engine.merge import list_methods as merges


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_lists_both_registries_and_json_is_describe(capsys):
    code, out, _ = _run(capsys, "methods")
    assert code == 0
    for name in merges():
        assert f"merge {name}: {get_merge(name).paper}" in out
    for name in compressors():
        assert f"compress {name}: {get_compressor(name).paper}" in out
    code, out, _ = _run(capsys, "methods", "compress", "--json")
    described = json.loads(out)
    assert [d["name"] for d in described] == list(compressors())
    assert described[0] == {"kind": "compress", **json.loads(json.dumps(get_compressor(described[0]["name"]).describe()))}


def test_one_method_in_full(capsys):
    code, out, _ = _run(capsys, "methods", "compress", "impart")
    assert code == 0
    for name, field in get_compressor("impart").params_class.model_fields.items():
        assert f"    {field.alias or name}:" in out, name
    assert "preset small-models" in out and "solved by --ratio" in out
    code, out, _ = _run(capsys, "methods", "merge", "ties")
    assert "per-model parameters:" in out and "density: number = 1.0 (> 0.0, <= 1.0)" in out


def test_bad_names_are_one_line_errors(capsys):
    for argv, needle in ((["methods", "merge", "nope"], "unknown merge method"),
                         (["methods", "compress", "nope"], "unknown compression method"),
                         (["methods", "ties"], "")):
        try:
            code, out, err = _run(capsys, *argv)
        except SystemExit as exit_:  # argparse: 'ties' is not a registry
            assert exit_.code == 2
            continue
        assert code == 2 and out == "" and err.startswith("error: ") and needle in err
