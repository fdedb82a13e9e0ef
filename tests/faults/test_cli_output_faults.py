"""What the command line prints for hostile input (issue 19, items 7, 10 and 13): one named line
and exit 2, never a traceback; names from a file are escaped before they reach the terminal; a
reader that closes the pipe early ends the command quietly.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.__main__ import main
from engine.errors import CheckpointFormatError, ConfigError
from engine.io import ModelFolder
from tests.io.builders import (TINY_CONFIG, f32_entry, folder_with_file, safetensors_bytes, snapshot,
                               write_model)

REPO_ROOT = Path(__file__).resolve().parents[2]


def one_line_error(capsys, argv, *needles) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    return err


# ---------------------------------------------------------------- item 7: dimensions
@pytest.mark.parametrize("shape", [[0, 2**64], [2**63, 0], [0, 10**6]],
                         ids=["beyond_uint64", "beyond_int64", "beyond_file"])
def test_header_dimension_larger_than_the_file_is_refused(tmp_path, shape):
    header = {"w": f32_entry(0, [1]), "empty": {"dtype": "F32", "shape": shape, "data_offsets": [4, 4]}}
    folder = folder_with_file(tmp_path / "m", safetensors_bytes(header, b"\0" * 4))
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointFormatError) as info:
        ModelFolder(folder)
    message = str(info.value)
    assert "model.safetensors" in message and "tensor 'empty'" in message
    assert "larger than the whole" in message
    assert snapshot(tmp_path) == before


def test_product_of_dimensions_beyond_int64_is_refused(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [2**31, 2**31, 2**31], "data_offsets": [0, 4]}}
    raw = json.dumps(header).encode()
    # the file is made large enough on paper (sparse) that each dimension alone fits in it
    folder = folder_with_file(tmp_path / "m", safetensors_bytes(raw, b"\0" * 4))
    with open(folder / "model.safetensors", "r+b") as handle:
        handle.truncate(2**31 + 64)
    with pytest.raises(CheckpointFormatError) as info:
        ModelFolder(folder)
    assert "tensor 'w'" in str(info.value) and "more than 2**63" in str(info.value)


def test_merge_of_a_model_with_a_huge_empty_dimension_is_a_named_error(tmp_path, capsys):
    header = {"model.norm.weight": f32_entry(0, [8]),
              "model.ghost": {"dtype": "F32", "shape": [0, 2**64], "data_offsets": [32, 32]}}
    folder = folder_with_file(tmp_path / "m", safetensors_bytes(header, b"\0" * 32))
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {folder}\n    parameters: {{weight: 1.0}}\n")
    one_line_error(capsys, ["merge", str(recipe), "--out", str(tmp_path / "out"), "--quiet"],
                   "model.ghost", "larger than the whole")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- item 10: tracebacks
@pytest.mark.parametrize("changes,needles", [
    ({"hidden_size": 64, "head_dim": 16}, ["config.json disagrees with its tensors", "tensor '"]),
    ({"hidden_size": 50, "head_dim": None}, ["config.json", "cannot build a causal LM"]),
], ids=["shape_mismatch", "unbuildable"])
def test_eval_of_a_config_that_disagrees_with_its_tensors(tmp_path, capsys, quick_zoo, changes, needles):
    folder = tmp_path / "m"
    shutil.copytree(quick_zoo / "small" / "base", folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    before = snapshot(tmp_path)
    one_line_error(capsys, ["eval", str(folder)], str(folder.resolve()), *needles)
    assert snapshot(tmp_path) == before


def test_inspect_into_a_closed_pipe_ends_quietly(tmp_path):
    # enough lines that the output overflows the pipe buffer after the reader is gone
    write_model(tmp_path / "m", {f"layer.{i}.weight": torch.zeros(2) for i in range(4000)},
                config=dict(TINY_CONFIG))
    proc = subprocess.Popen([sys.executable, "-m", "engine", "inspect", str(tmp_path / "m")],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    proc.stdout.close()  # what `| head -1` does
    stderr = proc.stderr.read().decode()
    code = proc.wait(timeout=120)
    assert first.startswith(b"folder:")
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
    assert code in (0, 141)


# ---------------------------------------------------------------- item 13: control characters
def test_inspect_escapes_control_characters_in_tensor_and_config_names(tmp_path, capsys):
    evil = "a\x1b[2Jb"
    folder = write_model(tmp_path / "m", {evil: torch.zeros(2), "ok\u202eyx": torch.zeros(1)},
                         config={**TINY_CONFIG, "model_type": "llama\x1b]0;owned\x07"})
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\u202e" not in out and "\x07" not in out
    assert "a\\x1b[2Jb" in out and "ok\\u202eyx" in out and "llama\\x1b]0;owned\\x07" in out
    assert main(["inspect", str(folder), "--json"]) == 0  # JSON escapes on its own
    assert evil in [t["name"] for t in json.loads(capsys.readouterr().out)["tensors"]]


def test_error_messages_escape_control_characters_in_paths(tmp_path, capsys):
    folder = tmp_path / "bad\x1b[2J\nname"
    folder.mkdir()
    with pytest.raises(ConfigError) as info:
        ModelFolder(folder)
    message = str(info.value)
    assert "\x1b" not in message and "\n" not in message
    assert "bad\\x1b[2J\\nname" in message
    err = one_line_error(capsys, ["inspect", str(folder)], "bad\\x1b[2J\\nname", "config.json")
    assert "\x1b" not in err


def test_pages_show_names_escaped(tmp_path):
    from pages._analysis import tensor_label
    from pages._shared import short_name

    assert tensor_label("model.layers.3.self_attn.q_proj\x1b[2J.weight").isprintable()
    assert "\\x1b[2J" in tensor_label("head\x1b[2J")
    assert short_name(tmp_path / "evil\u202eblah") == "evil\\u202eblah"
