"""ModelWriter: round trips, sharding, metadata, index, manifest, refusals, cleanup."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors import safe_open

from engine.errors import ExportError
from engine.io import ModelFolder, ModelWriter
from engine.io.writer import INDEX_NAME, MANIFEST_NAME, shard_name
from tests.io.builders import TINY_CONFIG, snapshot, staging_leftovers, tiny_tensors, write_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_single_file_is_bit_exact(tmp_path, dtype):
    tensors = tiny_tensors(dtype)
    dest = write_model(tmp_path / "out", tensors)
    assert sorted(os.listdir(dest)) == ["config.json", MANIFEST_NAME, "model.safetensors"]
    with ModelFolder(dest) as mf:
        assert sorted(mf.tensor_names) == sorted(tensors)
        for name, expected in tensors.items():
            got = mf.get_tensor(name)
            assert got.dtype == dtype and torch.equal(got, expected), name
    assert json.loads((dest / "config.json").read_text()) == TINY_CONFIG
    assert staging_leftovers(tmp_path) == []


def test_small_max_shard_bytes_gives_several_shards_and_a_valid_index(tmp_path):
    tensors = tiny_tensors(torch.float32)
    total = sum(t.numel() * 4 for t in tensors.values())
    dest = write_model(tmp_path / "out", tensors, max_shard_bytes=700)
    index = json.loads((dest / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    count = len(shards)
    assert count >= 3
    assert shards == [shard_name(i, count) for i in range(1, count + 1)]
    assert not (dest / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == total
    assert sorted(index["weight_map"]) == sorted(tensors)
    for shard in shards:
        with safe_open(str(dest / shard), framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            keys = set(handle.keys())
            assert keys == {k for k, v in index["weight_map"].items() if v == shard}
            size = sum(handle.get_tensor(k).numel() * 4 for k in keys)
            # a shard holds more than one tensor only while under the limit
            assert size <= 700 or len(keys) == 1
    with ModelFolder(dest) as mf:
        for name, expected in tensors.items():
            assert torch.equal(mf.get_tensor(name), expected)


def test_manifest_lists_every_file_with_correct_sha256_and_extra(tmp_path):
    dest = write_model(tmp_path / "out", tiny_tensors(), max_shard_bytes=700,
                       manifest_extra={"recipe": {"method": "ties", "k": 0.2}},
                       extra_files={"tokenizer.json": b'{"v": 1}', "generation_config.json": {"a": 1}})
    manifest = json.loads((dest / MANIFEST_NAME).read_text())
    on_disk = sorted(n for n in os.listdir(dest) if n != MANIFEST_NAME)
    assert sorted(manifest["files"]) == on_disk
    for name, entry in manifest["files"].items():
        data = (dest / name).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["size"] == len(data)
    assert manifest["recipe"] == {"method": "ties", "k": 0.2}
    assert manifest["tensor_count"] == len(tiny_tensors())
    assert isinstance(manifest["engine_version"], str) and manifest["created"].endswith("Z")
    assert (dest / "tokenizer.json").read_bytes() == b'{"v": 1}'
    assert json.loads((dest / "generation_config.json").read_text()) == {"a": 1}


def test_extra_file_copied_from_path(tmp_path):
    source = tmp_path / "tok.json"
    source.write_bytes(b"tokenizer-bytes")
    dest = write_model(tmp_path / "out", tiny_tensors(), extra_files={"tokenizer.json": source})
    assert (dest / "tokenizer.json").read_bytes() == b"tokenizer-bytes"


def test_tied_and_strided_tensors_are_saved_as_independent_copies(tmp_path):
    embed = torch.randn(6, 4)
    original = embed.clone()
    base = torch.randn(4, 6)
    with ModelWriter(tmp_path / "out", config=TINY_CONFIG) as w:
        w.add_tensor("embed", embed)
        w.add_tensor("head", embed)            # same storage (tied weights)
        w.add_tensor("view", embed[1:3])       # a view into the same storage
        w.add_tensor("transposed", base.t())   # non-contiguous
        embed.add_(100.0)                      # caller mutates after add: must not leak in
    with ModelFolder(tmp_path / "out") as mf:
        assert torch.equal(mf.get_tensor("embed"), original)
        assert torch.equal(mf.get_tensor("head"), original)
        assert torch.equal(mf.get_tensor("view"), original[1:3])
        assert torch.equal(mf.get_tensor("transposed"), base.t())


def test_integer_bool_and_scalar_tensors_round_trip(tmp_path):
    tensors = {"ids": torch.arange(5, dtype=torch.int64), "mask": torch.tensor([True, False]),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3)}
    dest = write_model(tmp_path / "out", tensors)
    with ModelFolder(dest) as mf:
        for name, t in tensors.items():
            got = mf.get_tensor(name)
            assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t)


def test_existing_empty_destination_is_filled(tmp_path):
    (tmp_path / "out").mkdir()
    write_model(tmp_path / "out", tiny_tensors())
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_missing_parents_are_created_and_removed_again_on_failure(tmp_path):
    dest = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError):
        with ModelWriter(dest, config=TINY_CONFIG) as w:
            w.add_tensor("x", torch.ones(2))
            raise RuntimeError("caller failed")
    assert snapshot(tmp_path) == []
    write_model(dest, tiny_tensors())
    assert (dest / "model.safetensors").is_file()


def test_caller_exception_propagates_unchanged_and_staging_is_removed(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with ModelWriter(tmp_path / "out", config=TINY_CONFIG, max_shard_bytes=16) as w:
            w.add_tensor("a", torch.ones(8))
            w.add_tensor("b", torch.ones(8))  # first shard already on disk in staging
            assert len(staging_leftovers(tmp_path)) == 1
            1 / 0
    assert snapshot(tmp_path) == []


def test_duplicate_tensor_name_refused_and_cleaned(tmp_path):
    with pytest.raises(ExportError, match="added twice") as info:
        with ModelWriter(tmp_path / "out", config=TINY_CONFIG) as w:
            w.add_tensor("a", torch.ones(2))
            w.add_tensor("a", torch.ones(2))
    assert info.value.tensor == "a" and str(tmp_path / "out") in str(info.value)
    assert snapshot(tmp_path) == []


def test_no_tensors_is_an_error(tmp_path):
    with pytest.raises(ExportError, match="no tensors"):
        with ModelWriter(tmp_path / "out", config=TINY_CONFIG):
            pass
    assert snapshot(tmp_path) == []


@pytest.mark.parametrize("bad", [
    {"extra_files": {"../x": b""}}, {"extra_files": {"config.json": b""}},
    {"extra_files": {"tok.json": "a/str/path"}}, {"manifest_extra": {"files": 1}},
    {"config": {"x": object()}}, {"max_shard_bytes": 0},
])
def test_bad_arguments_refused_before_anything_is_written(tmp_path, bad):
    kwargs = {"config": TINY_CONFIG, **bad}
    with pytest.raises(ExportError):
        ModelWriter(tmp_path / "out", **kwargs)
    assert snapshot(tmp_path) == []


def test_add_after_finalize_refused(tmp_path):
    writer = ModelWriter(tmp_path / "out", config=TINY_CONFIG)
    writer.add_tensor("a", torch.ones(2))
    assert writer.finalize() == tmp_path / "out"
    with pytest.raises(ExportError, match="done"):
        writer.add_tensor("b", torch.ones(2))
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_writer_without_config_writes_no_config(tmp_path):
    with ModelWriter(tmp_path / "out") as w:
        w.add_tensor("a", torch.ones(2))
    assert not (tmp_path / "out" / "config.json").exists()
    assert (tmp_path / "out" / "model.safetensors").is_file()
