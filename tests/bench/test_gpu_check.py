"""bench/gpu_check.py, the script a CUDA machine runs: its comparison catches a wrong tensor, and
its CPU-vs-CPU run (the only one a CPU machine can make) passes end to end and writes its rows."""

from __future__ import annotations

import importlib
import json
import pytest
import torch


@pytest.fixture(scope="module")
def gpu_check():
    return importlib.import_module("bench.gpu_check")


def test_compare_names_the_worst_tensor_and_the_missing_ones(gpu_check):
    a = {"x": torch.ones(4, 4), "y": torch.ones(3), "only_a": torch.zeros(1)}
    b = {"x": torch.ones(4, 4), "y": torch.tensor([1.0, 1.0, 1.1])}
    row = gpu_check.compare(a, b)
    assert row["tensor"] == "y"
    assert row["max_rel_err"] == pytest.approx(0.1 / float(torch.tensor([1.0, 1.0, 1.1]).norm()), rel=1e-6)
    assert row["only_one"] == ["only_a"]
    assert gpu_check.compare({"x": torch.ones(2)}, {"x": torch.ones(3)})["max_rel_err"] == float("inf")


def test_cpu_against_cpu_passes_and_writes_rows(gpu_check, quick_zoo, tmp_path):
    out = tmp_path / "gpu_check.json"
    code = gpu_check.main(["--devices", "cpu,cpu", "--zoo", str(quick_zoo), "--out", str(out),
                           "--methods", "ties", "slerp", "--skip", "compress", "--work", str(tmp_path / "w")])
    record = json.loads(out.read_text())
    assert code == 0
    assert [(r["path"], r.get("method")) for r in record["rows"]] == [
        ("merge", "ties"), ("merge", "slerp"), ("analyze", None)]
    assert all(r["ok"] and r["max_rel_err"] == 0.0 for r in record["rows"])


def test_a_device_that_does_not_exist_fails_the_check(gpu_check, quick_zoo, tmp_path):
    out = tmp_path / "gpu_check.json"
    code = gpu_check.main(["--devices", "cpu,tpu", "--zoo", str(quick_zoo), "--out", str(out),
                           "--methods", "linear", "--skip", "compress", "analyze", "--work", str(tmp_path / "w")])
    record = json.loads(out.read_text())
    assert code == 1
    assert record["rows"][0]["ok"] is False and "device" in record["rows"][0]["error"]
