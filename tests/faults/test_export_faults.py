"""reliability.md items 14-17: export failures leave nothing behind; a good export is verifiable."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import engine.io.shard as shard_module
from engine.io.shard import _pwrite_all as real_pwrite_all
from engine.errors import ExportError
from engine.io import ModelFolder, ModelWriter, sweep_orphan_staging
from tests.io.builders import (TINY_CONFIG, buffered_twin, first_data_byte, flip_byte, snapshot,
                               staging_leftovers, tiny_tensors, write_model)

REPO_ROOT = Path(__file__).resolve().parents[2]


def _fail_on_shard(n: int, exc: BaseException):
    """A ``_pwrite_all`` that raises on the n-th shard file's first write: the file exists and
    holds part of what was asked (as a real disk-full leaves it)."""
    inodes: list[int] = []

    def pwrite_all(fd, data, offset):
        inode = os.fstat(fd).st_ino
        if inode not in inodes:
            inodes.append(inode)
            if len(inodes) == n:
                twin = buffered_twin(fd)  # (fd may be the O_DIRECT one)
                os.pwrite(twin, b"partial", 0)
                os.close(twin)
                raise exc
        return real_pwrite_all(fd, data, offset)
    return pwrite_all


def _export(dest, **kw):
    with ModelWriter(dest, config=TINY_CONFIG, max_shard_bytes=300, **kw) as writer:
        for name, tensor in tiny_tensors().items():
            writer.add_tensor(name, tensor)


# ---------------------------------------------------------------- 14: disk full
def test_disk_full_on_shard_two(tmp_path, monkeypatch):
    monkeypatch.setattr(shard_module, "_pwrite_all",
                        _fail_on_shard(2, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    dest = tmp_path / "merged"
    with pytest.raises(ExportError) as info:
        _export(dest)
    assert str(dest) in str(info.value) and "No space left on device" in str(info.value)
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    assert snapshot(tmp_path) == []


def test_interrupt_during_shard_write(tmp_path, monkeypatch):
    monkeypatch.setattr(shard_module, "_pwrite_all", _fail_on_shard(2, KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        _export(tmp_path / "merged")
    assert snapshot(tmp_path) == []


def test_interrupt_between_tensors(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with ModelWriter(tmp_path / "merged", config=TINY_CONFIG, max_shard_bytes=300) as writer:
            for i, (name, tensor) in enumerate(tiny_tensors().items()):
                writer.add_tensor(name, tensor)
                if i == 4:
                    assert len(staging_leftovers(tmp_path)) == 1
                    raise KeyboardInterrupt
    assert snapshot(tmp_path) == []


def test_verification_catches_a_corrupted_shard(tmp_path, monkeypatch):
    def corrupting(fd, data, offset):
        real_pwrite_all(fd, data, offset)
        position = first_data_byte(fd, offset, len(data))  # a tensor's data, not the header
        if position is not None:
            flip_byte(fd, position)
    monkeypatch.setattr(shard_module, "_pwrite_all", corrupting)
    with pytest.raises(ExportError, match="verification failed: bytes differ") as info:
        _export(tmp_path / "merged")
    assert info.value.tensor is not None and str(tmp_path / "merged") in str(info.value)
    assert snapshot(tmp_path) == []


# ---------------------------------------------------------------- 15: killed worker
WORKER = textwrap.dedent("""
    import sys, time, torch
    from engine.io import ModelWriter
    writer = ModelWriter(sys.argv[1], config={"model_type": "llama"}, max_shard_bytes=64).open()
    for i in range(3):
        writer.add_tensor(f"w{i}", torch.ones(16))   # 64 bytes each: shards hit the disk
    print("READY", flush=True)
    time.sleep(600)
""")


def test_worker_killed_mid_export_leaves_only_a_sweepable_staging_folder(tmp_path):
    dest = tmp_path / "merged"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(dest)], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300  # importing torch on a busy 2-core machine is slow
        line = b""
        while time.monotonic() < deadline and proc.poll() is None:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                line = proc.stdout.readline()
                break
        assert line.strip() == b"READY", proc.stderr.read().decode() if proc.poll() is not None else line
        staging = [tmp_path / n for n in staging_leftovers(tmp_path)]
        assert len(staging) == 1 and any(p.suffix == ".safetensors" for p in staging[0].iterdir())
        assert sweep_orphan_staging(tmp_path) == []  # the writer is alive: its folder is kept
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not dest.exists()
    assert sweep_orphan_staging(tmp_path) == staging
    assert snapshot(tmp_path) == []


# ---------------------------------------------------------------- 16: refused destinations
def test_destination_exists_and_is_not_empty(tmp_path):
    dest = tmp_path / "merged"
    dest.mkdir()
    (dest / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not empty") as info:
        _export(dest)
    assert str(dest) in str(info.value)
    assert snapshot(tmp_path) == ["merged", "merged/notes.txt"]
    assert (dest / "notes.txt").read_text() == "keep me"


def test_destination_is_a_file(tmp_path):
    (tmp_path / "merged").write_text("x")
    with pytest.raises(ExportError, match="not a folder"):
        _export(tmp_path / "merged")
    assert snapshot(tmp_path) == ["merged"]


@pytest.mark.parametrize("relative", ["sub/out", "out", "a/b/c"])
def test_destination_inside_an_input_model_folder(tmp_path, relative):
    model = write_model(tmp_path / "base", tiny_tensors())
    before = snapshot(tmp_path)
    dest = model / relative
    with pytest.raises(ExportError, match="inside input model folder") as info:
        _export(dest, input_folders=[tmp_path / "other", model])
    assert str(dest) in str(info.value)
    assert snapshot(tmp_path) == before


def test_destination_reaching_an_input_through_a_symlink(tmp_path):
    model = write_model(tmp_path / "base", tiny_tensors())
    os.symlink(model, tmp_path / "alias")
    before = snapshot(tmp_path)
    with pytest.raises(ExportError, match="inside input model folder"):
        _export(tmp_path / "alias" / "out", input_folders=[model])
    assert snapshot(tmp_path) == before


def test_destination_that_is_the_input_folder_itself(tmp_path):
    model = write_model(tmp_path / "base", tiny_tensors())
    before = snapshot(tmp_path)
    with pytest.raises(ExportError):
        _export(model, input_folders=[model])
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- 17: a verifiable round trip
def test_round_trip_is_verifiable_by_anyone(tmp_path):
    tensors = tiny_tensors(torch.bfloat16)
    dest = tmp_path / "merged"
    with ModelWriter(dest, config=TINY_CONFIG, max_shard_bytes=300, manifest_extra={"recipe": "r"}) as w:
        for name, tensor in tensors.items():
            w.add_tensor(name, tensor)
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in tensors.values())
    manifest = json.loads((dest / "delta_workbench_manifest.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(dest / shard), framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            for key in handle.keys():
                assert torch.equal(handle.get_tensor(key), tensors[key])
        assert manifest["files"][shard]["sha256"] == hashlib.sha256((dest / shard).read_bytes()).hexdigest()
    assert manifest["recipe"] == "r"
    ModelFolder(dest, check_finite=True)  # our own strict reader accepts it too
    assert staging_leftovers(tmp_path) == []
