"""engine.io.shard: one safetensors file written in place, read back and hashed as it is written."""

from __future__ import annotations

import hashlib
import json
import os
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import save_file

import engine.io.shard as shard_module
from engine.errors import ExportError
from engine.io import ModelWriter
from engine.io.names import MANIFEST_NAME
from engine.io.shard import PIECE, ShardFile
from engine.io.stages import StageTimes
from tests.io.builders import TINY_CONFIG, flip_byte


def mixed():
    gen = torch.Generator().manual_seed(3)
    return {
        "b.weight": torch.randn(7, 5, generator=gen).to(torch.bfloat16),
        "a.weight": torch.randn(3, generator=gen),
        "ids": torch.arange(6, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "half": torch.randn(2, 2, generator=gen).half(),
        "double": torch.randn(4, generator=gen, dtype=torch.float64),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "byte": torch.tensor([1, 2, 3], dtype=torch.uint8),
        "gewicht.ä": torch.ones(2),  # non-ASCII names are stored as UTF-8, as safetensors does
        # larger than one read-back piece, and not a multiple of it
        "big": torch.randn(PIECE // 4 + 333, generator=gen),
    }


def write_shard(path, tensors, order, names=None, **kw):
    shard = ShardFile(path, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], order=order, **kw)
    for name in names or list(tensors):
        shard.write(name, tensors[name])
    return shard.finish()


def test_safetensors_order_is_byte_for_byte_save_file(tmp_path):
    tensors = mixed()
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    result = write_shard(tmp_path / "ours.safetensors", tensors, "safetensors")
    ours, ref = (tmp_path / "ours.safetensors").read_bytes(), (tmp_path / "ref.safetensors").read_bytes()
    assert ours == ref
    assert result.sha256 == hashlib.sha256(ref).hexdigest() and result.size == len(ref)


@pytest.fixture
def checker():
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("threaded", [False, True])
def test_sha256_in_any_write_order_is_the_files(tmp_path, verify, threaded, checker):
    tensors = mixed()
    names = list(tensors)
    random.Random(0).shuffle(names)
    result = write_shard(tmp_path / "s.safetensors", tensors, "plan", names=names, verify=verify,
                         checker=checker if threaded else None)
    assert result.sha256 == hashlib.sha256((tmp_path / "s.safetensors").read_bytes()).hexdigest()


def test_plan_order_keeps_the_callers_order_within_an_element_size(tmp_path):
    tensors = {"z": torch.ones(3), "m": torch.ones(2, dtype=torch.bfloat16), "a": torch.ones(2),
               "q": torch.ones(1, dtype=torch.float64)}
    write_shard(tmp_path / "s.safetensors", tensors, "plan")
    raw = (tmp_path / "s.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    by_offset = sorted((v["data_offsets"][0], k) for k, v in header.items() if k != "__metadata__")
    assert [k for _, k in by_offset] == ["q", "z", "a", "m"]


@pytest.mark.parametrize("threaded", [False, True])
def test_bytes_changed_between_write_and_read_back_are_caught_naming_the_tensor(tmp_path, monkeypatch,
                                                                                threaded, checker):
    real = shard_module._pwrite_all

    def corrupting(fd, data, offset):
        real(fd, data, offset)
        if len(data) > PIECE:  # only "big": flip a byte in its second piece
            flip_byte(fd, offset + PIECE + 1)

    monkeypatch.setattr(shard_module, "_pwrite_all", corrupting)
    with pytest.raises(ExportError, match="bytes differ") as info:
        write_shard(tmp_path / "s.safetensors", mixed(), "plan", checker=checker if threaded else None)
    assert info.value.tensor == "big"


def test_a_tensor_written_twice_is_refused(tmp_path):
    t = torch.ones(2)
    shard = ShardFile(tmp_path / "s.safetensors", [("a", t.dtype, (2,))])
    shard.write("a", t)
    with pytest.raises(ExportError, match="added twice"):
        shard.write("a", t)
    shard.close()


def test_stage_times_are_recorded_in_the_manifest(tmp_path):
    times = StageTimes()
    tensors = mixed()
    plan = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    with ModelWriter(tmp_path / "out", config=TINY_CONFIG, plan=plan, times=times) as writer:
        for name, t in tensors.items():
            writer.add_tensor(name, t)
    timings = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())["timings"]
    assert {"write", "verify", "hash", "fsync"} <= set(timings)
    assert all(v >= 0 for v in timings.values())
    assert times.calls()["write"] >= len(tensors) - 1  # the empty tensor writes nothing


# ---------------------------------------------------------------- direct I/O
@pytest.fixture
def small_blocks(monkeypatch, tmp_path):
    """Direct I/O with a bounce buffer and read-back pieces of a few blocks, so a small shard
    crosses many of their boundaries (tensors straddling them, a partial last block)."""
    if not shard_module.direct_io_works(tmp_path):
        pytest.skip("no O_DIRECT on this filesystem")
    monkeypatch.setattr(shard_module, "BOUNCE", 3 * shard_module.ALIGN)
    monkeypatch.setattr(shard_module, "DIRECT_PIECE", 2 * shard_module.ALIGN)


def opened_shard(path, tensors, **kw):
    return ShardFile(path, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], order="plan", **kw)


def in_file_order(shard, tensors):
    return sorted(tensors, key=lambda n: shard._spans[shard._index[n]][0])


def buffered_reference(tmp_path, monkeypatch, tensors) -> bytes:
    monkeypatch.setattr(shard_module, "DIRECT_IO", False)
    try:
        shard = opened_shard(tmp_path / "buffered.safetensors", tensors)
        for name in in_file_order(shard, tensors):
            shard.write(name, tensors[name])
        shard.finish()
    finally:
        monkeypatch.setattr(shard_module, "DIRECT_IO", True)
    return (tmp_path / "buffered.safetensors").read_bytes()


@pytest.mark.parametrize("threaded", [False, True])
def test_in_order_writes_go_to_disk_directly_and_are_read_back_from_it(tmp_path, monkeypatch, small_blocks,
                                                                      threaded, checker):
    tensors = mixed()
    tensors["wide"] = torch.randn(5 * shard_module.ALIGN // 4 + 7)  # several bounce buffers
    expected = buffered_reference(tmp_path, monkeypatch, tensors)
    direct_reads = []
    real = shard_module._pread_direct
    monkeypatch.setattr(shard_module, "_pread_direct",
                        lambda fd, buf, offset: direct_reads.append(offset) or real(fd, buf, offset))
    shard = opened_shard(tmp_path / "s.safetensors", tensors, checker=checker if threaded else None)
    for name in in_file_order(shard, tensors):
        shard.write(name, tensors[name])
    result = shard.finish()
    raw = (tmp_path / "s.safetensors").read_bytes()
    assert raw == expected and result.size == len(expected)
    assert result.sha256 == hashlib.sha256(expected).hexdigest()
    nonempty = [i for i, (b, e, _) in enumerate(shard._spans) if e > b]
    assert all(shard._on_disk[i] for i in nonempty)  # every tensor was read back from the disk
    assert direct_reads and all(offset % shard_module.ALIGN == 0 for offset in direct_reads)


def test_a_write_out_of_file_order_turns_the_rest_buffered(tmp_path, monkeypatch, small_blocks):
    tensors = mixed()
    expected = buffered_reference(tmp_path, monkeypatch, tensors)
    shard = opened_shard(tmp_path / "s.safetensors", tensors)
    order = in_file_order(shard, tensors)
    order = order[:3] + order[4:] + order[3:4]  # the fourth tensor last
    for name in order:
        shard.write(name, tensors[name])
    result = shard.finish()
    assert (tmp_path / "s.safetensors").read_bytes() == expected
    assert result.sha256 == hashlib.sha256(expected).hexdigest()
    assert not shard._writing_direct and not all(shard._on_disk)


def test_direct_io_refused_by_the_filesystem_falls_back_to_buffered(tmp_path, monkeypatch, small_blocks):
    import errno
    import fcntl

    tensors = mixed()
    expected = buffered_reference(tmp_path, monkeypatch, tensors)
    real = shard_module._pwrite_all

    def refusing(fd, data, offset):  # as a filesystem whose blocks are larger than ALIGN
        if fcntl.fcntl(fd, fcntl.F_GETFL) & shard_module._O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        real(fd, data, offset)

    monkeypatch.setattr(shard_module, "_pwrite_all", refusing)
    shard = opened_shard(tmp_path / "s.safetensors", tensors)
    for name in in_file_order(shard, tensors):
        shard.write(name, tensors[name])
    result = shard.finish()
    assert (tmp_path / "s.safetensors").read_bytes() == expected
    assert result.sha256 == hashlib.sha256(expected).hexdigest()
    assert not any(shard._on_disk)


def test_other_write_errors_of_the_direct_path_are_raised(tmp_path, monkeypatch, small_blocks):
    import errno

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    tensors = {"w": torch.randn(4 * shard_module.ALIGN)}
    shard = opened_shard(tmp_path / "s.safetensors", tensors)
    monkeypatch.setattr(shard_module, "_pwrite_all", full)
    with pytest.raises(OSError, match="No space left"):
        shard.write("w", tensors["w"])
    shard.close()


@pytest.mark.parametrize("direct", [True, False])
def test_bytes_changed_on_disk_are_caught_on_both_paths(tmp_path, monkeypatch, direct, checker):
    if direct and not shard_module.direct_io_works(tmp_path):
        pytest.skip("no O_DIRECT on this filesystem")
    monkeypatch.setattr(shard_module, "DIRECT_IO", direct)
    real = shard_module._pwrite_all
    tensors = mixed()

    def corrupting(fd, data, offset):
        real(fd, data, offset)
        if offset + len(data) > target:
            flip_byte(fd, target)  # once the byte is written: a change behind the writer's back

    shard = opened_shard(tmp_path / "s.safetensors", tensors, checker=checker)
    begin, _, _ = shard._spans[shard._index["big"]]
    target = shard.data_start + begin + 12345
    monkeypatch.setattr(shard_module, "_pwrite_all", corrupting)
    with pytest.raises(ExportError, match="bytes differ") as info:
        for name in in_file_order(shard, tensors):
            shard.write(name, tensors[name])
        shard.finish()
    assert info.value.tensor == "big"
    shard.close()


def test_only_the_shard_being_written_holds_direct_io_resources(tmp_path, monkeypatch, small_blocks, checker):
    """A writer lays out every shard of its plan up front and keeps them until it is done: the
    direct descriptor and buffers are made at a shard's first write, and a finished shard's
    are closed and unmapped, so a model of hundreds of shards holds one set."""
    tensors = mixed()
    shard = opened_shard(tmp_path / "s.safetensors", tensors, checker=checker)
    assert shard._bounce is None and shard._direct is None  # nothing held before the first write
    maps = []
    for name in in_file_order(shard, tensors):
        shard.write(name, tensors[name])
        if not maps:
            maps = [shard._bounce.obj] + [view.obj for view in shard._stream._buffers]
    shard.finish()
    assert all(m.closed for m in maps)
    assert shard._bounce is None and shard._stream is None and shard.fd is None
