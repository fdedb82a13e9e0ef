"""Issue 19 item 11b (reliability 23): a CUDA out-of-memory on one tensor does not fail the run.

The tensor is retried on the CPU, the merge (or compression) finishes with the same bytes as a
CPU run, and the CLI, the job result and the manifest name the tensor. Runs without a GPU:
the device is reported as CUDA and the per-tensor compute raises ``torch.OutOfMemoryError``
for one tensor while it is asked to run there (elsewhere it computes on the CPU, standing for
the GPU).
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import engine.merge.executor as executor
from engine.__main__ import main
from engine.compress.encode import _encode_matrix
from engine.compress.registry import get_method
from engine.io import ModelFolder
from engine.io.writer import MANIFEST_NAME
from engine.jobs.kinds import get_kind
from engine.merge.spec import MergeSpec
from tests.io.builders import snapshot, tiny_tensors, write_model

TARGET = "model.layers.1.mlp.up_proj.weight"
WARNING = f"tensor {TARGET!r}: CUDA out of memory; merged on the CPU instead"


@pytest.fixture()
def models(tmp_path):
    root = tmp_path / "models"
    return [write_model(root / name, tiny_tensors(seed=seed)) for name, seed in
            (("base", 0), ("a", 1), ("b", 2))]


def _recipe(models) -> dict:
    base, a, b = models
    return {"merge_method": "task_arithmetic", "base_model": str(base),
            "models": [{"model": str(a), "parameters": {"weight": 0.7}},
                       {"model": str(b), "parameters": {"weight": 0.4}}]}


def install_fake_cuda(monkeypatch) -> list[tuple[str, str]]:
    """The merge sees a CUDA device; TARGET runs out of memory there. Returns the attempts."""
    attempts: list[tuple[str, str]] = []
    real = MergeSpec.merge_into

    def merge_into(self, name, base, models, out, *, device="cpu", **kw):
        device = torch.device(device)
        attempts.append((name, device.type))
        if device.type == "cuda":
            if name == TARGET:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            device = torch.device("cpu")  # stands for the GPU: the same arithmetic
        return real(self, name, base, models, out, device=device, **kw)

    monkeypatch.setattr(executor, "resolve_device", lambda device=None: torch.device("cuda"))
    monkeypatch.setattr(MergeSpec, "merge_into", merge_into)
    return attempts


@pytest.fixture()
def fake_cuda(monkeypatch):
    return install_fake_cuda(monkeypatch)


def _tensors(folder):
    with ModelFolder(folder) as mf:
        return {n: t.clone() for n, t in mf.iter_tensors()}


def _cpu_reference(models, tmp_path):
    from engine.recipe import parse_recipe

    return _tensors(executor.run_merge(parse_recipe(_recipe(models)), tmp_path / "reference",
                                       device="cpu").out)


def test_cli_merge_retries_the_tensor_on_cpu_and_says_so(models, tmp_path, capsys, monkeypatch):
    reference = _cpu_reference(models, tmp_path)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump(_recipe(models)))
    out = tmp_path / "out"
    attempts = install_fake_cuda(monkeypatch)
    code = main(["merge", str(recipe), "--out", str(out), "--quiet"])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert f"warning: {WARNING}\n" in err and "Traceback" not in err
    assert [a for a in attempts if a[0] == TARGET] == [(TARGET, "cuda"), (TARGET, "cpu")]
    assert all(device == "cuda" for name, device in attempts if name != TARGET)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["cpu_fallback"] == [TARGET] and WARNING in manifest["warnings"]
    merged = _tensors(out)
    assert merged.keys() == reference.keys()
    assert all(torch.equal(merged[n], reference[n]) for n in reference)  # bit for bit
    assert [p.name for p in tmp_path.iterdir() if "staging" in p.name] == []


def test_merge_job_finishes_and_its_result_names_the_tensor(models, tmp_path, fake_cuda, monkeypatch):
    monkeypatch.setenv("DELTA_WORKBENCH_MODEL_ROOTS", str(tmp_path))  # a job reads inside the roots only
    kind = get_kind("merge")
    messages: list[str] = []
    out = tmp_path / "job_out"
    params = kind.params_class(recipe_yaml=yaml.safe_dump(_recipe(models)), out=str(out))
    result = kind.run(params, lambda fraction, message: messages.append(message))
    assert result["device"] == "cuda" and WARNING in result["warnings"]
    assert any(TARGET in m and "on the CPU" in m for m in messages)
    assert json.loads((out / MANIFEST_NAME).read_text())["cpu_fallback"] == [TARGET]


def test_an_out_of_memory_on_the_cpu_is_not_hidden(models, tmp_path, monkeypatch):
    def merge_into(self, name, *args, **kw):
        raise torch.OutOfMemoryError("out of memory")

    monkeypatch.setattr(MergeSpec, "merge_into", merge_into)
    from engine.recipe import parse_recipe

    before = snapshot(tmp_path)
    with pytest.raises(torch.OutOfMemoryError):
        executor.run_merge(parse_recipe(_recipe(models)), tmp_path / "out", device="cpu")
    assert snapshot(tmp_path) == before  # no output, no staging


def test_compress_encode_retries_the_matrix_on_cpu(monkeypatch):
    spec = get_method("magnitude")
    params = spec.parse_params({}, 4.0)
    delta = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    expected, _ = _encode_matrix(spec, params, TARGET, 0, delta, 64, None, torch.device("cpu"), [])
    real = spec.module.encode
    seen: list[str] = []

    def encode(matrix, budget, p, ctx):
        seen.append(ctx.device.type)
        if ctx.device.type == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(matrix, budget, p, ctx)

    monkeypatch.setattr(spec.module, "encode", encode)
    fallback: list[str] = []
    section, ctx = _encode_matrix(spec, params, TARGET, 0, delta, 64, None, torch.device("cuda"),
                                  fallback)
    assert seen == ["cuda", "cpu"] and ctx.device.type == "cpu"
    assert fallback == [TARGET] and bytes(section) == bytes(expected)
