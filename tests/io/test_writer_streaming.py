"""ModelWriter's streaming mode (plan given up front): bytes written in place, same guarantees."""

from __future__ import annotations

import errno
import hashlib
import json
import os

import pytest
import torch
from safetensors import safe_open

import engine.io.shard as shard_module
from engine.errors import ExportError
from engine.io import ModelFolder, ModelWriter
from engine.io.writer import INDEX_NAME, MANIFEST_NAME
from tests.io.builders import TINY_CONFIG, first_data_byte, flip_byte, snapshot, tiny_tensors


def mixed_tensors():
    tensors = tiny_tensors(torch.bfloat16)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].float()  # mixed itemsizes
    tensors["step"] = torch.tensor(7, dtype=torch.int64)
    tensors["flag"] = torch.tensor([True, False, True])
    tensors["empty"] = torch.zeros(0, 4)
    return tensors


def plan_of(tensors):
    return [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]


def write_streaming(dest, tensors, order=None, **kw):
    with ModelWriter(dest, config=TINY_CONFIG, plan=plan_of(tensors), **kw) as writer:
        for name in order or list(tensors):
            writer.add_tensor(name, tensors[name])
    return dest


@pytest.mark.parametrize("max_shard_bytes", [2**30, 200])
def test_round_trip_in_any_order_single_and_sharded(tmp_path, max_shard_bytes):
    tensors = mixed_tensors()
    order = list(reversed(tensors))
    dest = write_streaming(tmp_path / "out", tensors, order=order, max_shard_bytes=max_shard_bytes)
    sharded = (dest / INDEX_NAME).exists()
    assert sharded == (max_shard_bytes == 200)
    with ModelFolder(dest) as mf:
        assert sorted(mf.tensor_names) == sorted(tensors)
        for name, expected in tensors.items():
            for got in (mf.get_tensor(name), mf.read_tensor(name)):
                assert got.dtype == expected.dtype and torch.equal(got, expected), name
    manifest = json.loads((dest / MANIFEST_NAME).read_text())
    for fname, info in manifest["files"].items():
        assert hashlib.sha256((dest / fname).read_bytes()).hexdigest() == info["sha256"]
    for shard in dest.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            for name in handle.keys():  # every tensor starts aligned to its element size
                t = handle.get_tensor(name)
                assert torch.equal(t, tensors[name])


def test_same_shard_split_as_the_buffered_writer(tmp_path):
    tensors = tiny_tensors(torch.float32)
    write_streaming(tmp_path / "stream", tensors, max_shard_bytes=300)
    with ModelWriter(tmp_path / "buffered", config=TINY_CONFIG, max_shard_bytes=300) as writer:
        for name, t in tensors.items():
            writer.add_tensor(name, t)
    index = [json.loads((tmp_path / d / INDEX_NAME).read_text())["weight_map"] for d in ("stream", "buffered")]
    assert index[0] == index[1]


def test_tensor_off_plan_or_mismatched_is_refused_and_cleaned(tmp_path):
    tensors = tiny_tensors()
    for bad_name, bad in (("not.planned", torch.ones(2)), ("model.norm.weight", torch.ones(3)),
                          ("model.norm.weight", torch.ones(8, dtype=torch.float64))):
        with pytest.raises(ExportError):
            with ModelWriter(tmp_path / "out", config=TINY_CONFIG, plan=plan_of(tensors)) as writer:
                writer.add_tensor(bad_name, bad)
        assert snapshot(tmp_path) == []


def test_planned_tensor_never_added_fails_at_finalize(tmp_path):
    tensors = tiny_tensors()
    with pytest.raises(ExportError, match="never added"):
        with ModelWriter(tmp_path / "out", config=TINY_CONFIG, plan=plan_of(tensors)) as writer:
            writer.add_tensor("model.norm.weight", tensors["model.norm.weight"])
    assert snapshot(tmp_path) == []


def test_bad_plans_refused_before_anything_is_written(tmp_path):
    for plan in ([], [("a", torch.float32, (2,)), ("a", torch.float32, (2,))],
                 [("a", torch.complex64, (2,))]):
        with pytest.raises(ExportError):
            ModelWriter(tmp_path / "out", plan=plan)
    assert snapshot(tmp_path) == []


def test_disk_full_while_writing_leaves_nothing(tmp_path, monkeypatch):
    tensors = tiny_tensors()
    real = os.pwrite
    calls = {"n": 0}

    def pwrite(fd, data, offset):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(shard_module.os, "pwrite", pwrite)
    with pytest.raises(ExportError, match="No space left on device"):
        write_streaming(tmp_path / "out", tensors, max_shard_bytes=300)
    assert snapshot(tmp_path) == []


def test_interrupt_between_tensors_leaves_nothing(tmp_path):
    tensors = tiny_tensors()
    with pytest.raises(KeyboardInterrupt):
        with ModelWriter(tmp_path / "out", config=TINY_CONFIG, plan=plan_of(tensors)) as writer:
            for i, (name, t) in enumerate(tensors.items()):
                writer.add_tensor(name, t)
                if i == 3:
                    raise KeyboardInterrupt
    assert snapshot(tmp_path) == []


def test_verification_catches_bytes_changed_after_writing(tmp_path, monkeypatch):
    tensors = tiny_tensors()
    real = shard_module._pwrite_all

    def corrupting(fd, data, offset):
        real(fd, data, offset)
        position = first_data_byte(fd, offset, len(data))  # a tensor's data, not the header
        if position is not None:
            flip_byte(fd, position)

    monkeypatch.setattr(shard_module, "_pwrite_all", corrupting)
    with pytest.raises(ExportError, match="verification failed: bytes differ"):
        write_streaming(tmp_path / "out", tensors)
    assert snapshot(tmp_path) == []


def test_a_plan_of_many_shards_opens_one_descriptor_per_shard(tmp_path):
    """Every shard of a plan is laid out (and opened) up front; a shard's second, direct-I/O
    descriptor exists only while it is written, so hundreds of shards stay within the open
    files a process may hold."""
    tensors = {f"w{i}": torch.full((64,), float(i)) for i in range(30)}  # 256 bytes each
    counts = []

    def shard_descriptors():
        return sum("shard-" in os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                   if os.path.exists(f"/proc/self/fd/{fd}"))

    with ModelWriter(tmp_path / "out", config=TINY_CONFIG, plan=plan_of(tensors), max_shard_bytes=300) as writer:
        for name, t in tensors.items():
            writer.add_tensor(name, t)
            counts.append(shard_descriptors())
    assert len(list((tmp_path / "out").glob("*.safetensors"))) == 30
    assert max(counts) <= 30 + 1
    assert ModelFolder(tmp_path / "out").get_tensor("w17").eq(17.0).all()
