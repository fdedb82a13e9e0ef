"""``python -m engine inspect``: inventory of good folders, one named line for bad ones."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.__main__ import main
from tests.io.builders import folder_with_file, safetensors_bytes, snapshot, tiny_tensors, write_model
from tests.io.test_pickle_optin import malicious_pickle_bytes

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_text_inventory(tmp_path, capsys):
    tensors = tiny_tensors(torch.bfloat16)
    dest = write_model(tmp_path / "m", tensors, max_shard_bytes=300)
    assert main(["inspect", str(dest)]) == 0
    out = capsys.readouterr().out
    assert f"tensors:     {len(tensors)}" in out
    assert f"parameters:  {sum(t.numel() for t in tensors.values())}" in out
    assert "BF16: 9" in out and "LlamaForCausalLM" in out
    assert "model-00001-of-" in out
    assert "model.layers.1.mlp.up_proj.weight" in out and "(16, 8)" in out


def test_json_inventory_with_finite_check(tmp_path, capsys):
    tensors = tiny_tensors()
    tensors["ids"] = torch.arange(3)
    dest = write_model(tmp_path / "m", tensors, max_shard_bytes=300)
    assert main(["inspect", str(dest), "--json", "--check-finite"]) == 0
    inv = json.loads(capsys.readouterr().out)
    assert inv["tensor_count"] == len(tensors) and inv["finite"] is True
    assert inv["parameter_count"] == sum(t.numel() for t in tensors.values())
    assert inv["total_bytes"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert inv["dtypes"] == {"F32": len(tensors) - 1, "I64": 1}
    assert sum(s["size"] for s in inv["shards"]) == sum((dest / s["file"]).stat().st_size for s in inv["shards"])
    by_name = {t["name"]: t for t in inv["tensors"]}
    assert by_name["model.embed_tokens.weight"]["shape"] == [12, 8]


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_non_finite_refused_with_one_line(tmp_path, capsys):
    tensors = tiny_tensors()
    tensors["model.norm.weight"][0] = math.nan
    dest = write_model(tmp_path / "m", tensors)
    assert main(["inspect", str(dest), "--check-finite"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "model.norm.weight" in line and "model.safetensors" in line and "1 NaN" in line


@pytest.mark.parametrize("payload,needle", [
    (b"\x00" * 3, "too small"),
    (safetensors_bytes({"w": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}, b"\0"), "unknown dtype"),
])
def test_bad_file_refused_with_one_line(tmp_path, capsys, payload, needle):
    folder = folder_with_file(tmp_path / "m", payload)
    assert main(["inspect", str(folder)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(folder / "model.safetensors") in line and needle in line


def test_missing_folder(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert "not found" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.safetensors"])
def test_pickle_refused_in_a_real_subprocess(tmp_path, name):
    sentinel = tmp_path / "SENTINEL"
    folder = folder_with_file(tmp_path / "m", malicious_pickle_bytes(sentinel), name=name)
    before = snapshot(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "engine", "inspect", str(folder)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr
    line = _one_error_line(proc.stderr)
    assert line.startswith("error: ") and str(folder / name) in line and "pickle" in line
    assert proc.stdout == ""
    assert not sentinel.exists() and snapshot(tmp_path) == before
