"""reliability.md items 1-7: every malformed or unsafe checkpoint is refused with a named error.

Each case asserts (a) the error type, (b) the message names the file (and tensor), (c) nothing
was written anywhere and neither torch.load nor pickle was ever called.
"""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from engine.errors import (CheckpointFormatError, ConfigError, DeltaWorkbenchError, PathNotAllowedError,
                           UnsafeFormatError)
from engine.io import ModelFolder
from engine.io.pickle_optin import load_pickle_state_dict
from tests.io.builders import (TINY_CONFIG, f32_entry, folder_with_file, safetensors_bytes, snapshot,
                               tiny_tensors, write_model)
from tests.io.test_pickle_optin import malicious_pickle_bytes
from tests.faults.refusal import assert_refused


@pytest.fixture(autouse=True)
def no_unpickling(monkeypatch):
    """Any call into torch.load or pickle loading during a refusal fails the test."""
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load / pickle loading was called")
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)


def refused(tmp_path, folder, error_type, *needles):
    """Open ``folder``; assert the error type, the named things, and no trace on disk."""
    return assert_refused(tmp_path, lambda: ModelFolder(folder), error_type, *needles)


def _sharded(tmp_path, name="m"):
    dest = write_model(tmp_path / name, tiny_tensors(), max_shard_bytes=300)
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    return dest, index


def _write_index(dest, index):
    (dest / "model.safetensors.index.json").write_text(json.dumps(index))


# ---------------------------------------------------------------- 1: truncation and size
def test_truncated_shard(tmp_path):
    dest, index = _sharded(tmp_path)
    shard = dest / sorted(set(index["weight_map"].values()))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[:-7])
    refused(tmp_path, dest, CheckpointFormatError, str(shard.resolve()), "truncated")


def test_header_length_beyond_file(tmp_path):
    folder = folder_with_file(tmp_path / "m", safetensors_bytes({"w": f32_entry(0, [1])}, b"\0" * 4,
                                                                length=10_000))
    refused(tmp_path, folder, CheckpointFormatError, "model.safetensors", "header length 10000")


@pytest.mark.parametrize("payload", [b"", b"\x05\x00\x00"], ids=["empty", "tiny"])
def test_tiny_or_empty_file(tmp_path, payload):
    folder = folder_with_file(tmp_path / "m", payload)
    refused(tmp_path, folder, CheckpointFormatError, "model.safetensors", "too small")


def test_trailing_garbage(tmp_path):
    dest = write_model(tmp_path / "m", tiny_tensors())
    with open(dest / "model.safetensors", "ab") as handle:
        handle.write(b"garbage!")
    refused(tmp_path, dest, CheckpointFormatError, "model.safetensors", "8 bytes of trailing data")


# ---------------------------------------------------------------- 2: inconsistent headers
def test_overlapping_offsets(tmp_path):
    header = {"a": f32_entry(0, [4]), "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    folder = folder_with_file(tmp_path / "m", safetensors_bytes(header, b"\0" * 24))
    refused(tmp_path, folder, CheckpointFormatError, "model.safetensors", "tensor 'b'", "overlap")


def test_shape_inconsistent_with_offsets(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [3, 3], "data_offsets": [0, 32]}}
    folder = folder_with_file(tmp_path / "m", safetensors_bytes(header, b"\0" * 32))
    refused(tmp_path, folder, CheckpointFormatError, "model.safetensors", "tensor 'w'", "needs 36 bytes")


def test_unknown_dtype(tmp_path):
    header = {"w": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}
    folder = folder_with_file(tmp_path / "m", safetensors_bytes(header, b"\0" * 8))
    refused(tmp_path, folder, CheckpointFormatError, "model.safetensors", "tensor 'w'", "unknown dtype 'F33'")


def test_non_string_metadata(tmp_path):
    header = {"__metadata__": {"format": "pt", "step": 3}, "w": f32_entry(0, [1])}
    folder = folder_with_file(tmp_path / "m", safetensors_bytes(header, b"\0" * 4))
    refused(tmp_path, folder, CheckpointFormatError, "model.safetensors", "non-string metadata")


def test_gap_between_tensors(tmp_path):
    header = {"a": f32_entry(0, [1]), "b": f32_entry(8, [1])}
    folder = folder_with_file(tmp_path / "m", safetensors_bytes(header, b"\0" * 12))
    refused(tmp_path, folder, CheckpointFormatError, "tensor 'b'", "gap")


def test_header_not_json(tmp_path):
    folder = folder_with_file(tmp_path / "m", safetensors_bytes(b'{"w": [1,', b""))
    refused(tmp_path, folder, CheckpointFormatError, "model.safetensors", "not valid JSON")


# ---------------------------------------------------------------- 3: duplicate key
def test_duplicate_tensor_key_in_one_header(tmp_path):
    entry = '{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    raw = ('{"w":' + entry + ',"w":' + entry + '}').encode()
    folder = folder_with_file(tmp_path / "m", safetensors_bytes(raw, b"\0" * 4))
    refused(tmp_path, folder, CheckpointFormatError, "model.safetensors", "tensor 'w'", "duplicate key")


# ---------------------------------------------------------------- 4: index vs shards
def test_same_tensor_in_two_shards(tmp_path):
    dest, index = _sharded(tmp_path)
    shards = sorted(set(index["weight_map"].values()))
    # rewrite shard 2 to also hold a tensor of shard 1 (index still maps it to shard 1)
    stolen = next(k for k, v in index["weight_map"].items() if v == shards[0])
    from safetensors.torch import load_file, save_file
    second = load_file(str(dest / shards[1]))
    second[stolen] = torch.zeros(1)
    save_file(second, str(dest / shards[1]), metadata={"format": "pt"})
    refused(tmp_path, dest, CheckpointFormatError, f"tensor {stolen!r}", "two shards", shards[0], shards[1])


def test_tensor_in_shard_but_not_in_index(tmp_path):
    dest, index = _sharded(tmp_path)
    dropped = sorted(index["weight_map"])[-1]
    del index["weight_map"][dropped]
    _write_index(dest, index)
    refused(tmp_path, dest, CheckpointFormatError, f"tensor {dropped!r}", "missing from model.safetensors.index.json")


def test_index_maps_tensor_to_the_wrong_shard(tmp_path):
    dest, index = _sharded(tmp_path)
    shards = sorted(set(index["weight_map"].values()))
    values = list(index["weight_map"].values())
    crowded = next(s for s in shards if values.count(s) >= 2)  # stays referenced after the move
    other = next(s for s in shards if s != crowded)
    moved = next(k for k, v in index["weight_map"].items() if v == crowded)
    index["weight_map"][moved] = other
    _write_index(dest, index)
    refused(tmp_path, dest, CheckpointFormatError, "model.safetensors.index.json", f"tensor {moved!r}",
            f"maps this tensor to {other} but it is stored in {crowded}")


def test_index_entry_absent_from_its_shard(tmp_path):
    dest, index = _sharded(tmp_path)
    index["weight_map"]["model.ghost.weight"] = sorted(set(index["weight_map"].values()))[0]
    _write_index(dest, index)
    refused(tmp_path, dest, CheckpointFormatError, "model.ghost.weight", "does not contain it")


def test_index_naming_a_missing_shard(tmp_path):
    dest, index = _sharded(tmp_path)
    index["weight_map"]["extra.weight"] = "model-00009-of-00009.safetensors"
    _write_index(dest, index)
    refused(tmp_path, dest, CheckpointFormatError, "model-00009-of-00009.safetensors", "not found")


def test_index_with_duplicate_keys_or_no_weight_map(tmp_path):
    dest, index = _sharded(tmp_path)
    (dest / "model.safetensors.index.json").write_text('{"weight_map": {"a": "x.safetensors"}, "weight_map": {}}')
    refused(tmp_path, dest, CheckpointFormatError, "model.safetensors.index.json", "duplicate key")
    _write_index(dest, {"metadata": {}})
    refused(tmp_path, dest, CheckpointFormatError, "model.safetensors.index.json", "weight_map")


# ---------------------------------------------------------------- 5: index escapes the folder
@pytest.mark.parametrize("value", ["../outside.safetensors", "/tmp/abs.safetensors", "sub/x.safetensors",
                                   "..\\win.safetensors", ".."])
def test_weight_map_traversal_or_absolute(tmp_path, value):
    dest, index = _sharded(tmp_path)
    name = sorted(index["weight_map"])[0]
    index["weight_map"][name] = value
    _write_index(dest, index)
    refused(tmp_path, dest, PathNotAllowedError, "model.safetensors.index.json", f"tensor {name!r}", "plain file name")


def test_weight_map_symlink_leading_outside(tmp_path):
    dest, index = _sharded(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shard = sorted(set(index["weight_map"].values()))[0]
    os.replace(dest / shard, outside / shard)
    os.symlink(outside / shard, dest / shard)
    refused(tmp_path, dest, PathNotAllowedError, shard, "outside the model folder")


def test_single_file_symlink_leading_outside(tmp_path):
    dest = write_model(tmp_path / "m", tiny_tensors())
    os.replace(dest / "model.safetensors", tmp_path / "real.safetensors")
    os.symlink(tmp_path / "real.safetensors", dest / "model.safetensors")
    refused(tmp_path, dest, PathNotAllowedError, "model.safetensors", "outside the model folder")


def test_symlink_inside_the_folder_is_fine(tmp_path):
    dest = write_model(tmp_path / "m", tiny_tensors())
    os.replace(dest / "model.safetensors", dest / "blob")
    os.symlink("blob", dest / "model.safetensors")
    assert len(ModelFolder(dest).tensor_names) == len(tiny_tensors())


def test_shard_that_is_a_fifo(tmp_path):
    dest, index = _sharded(tmp_path)
    shard = sorted(set(index["weight_map"].values()))[0]
    (dest / shard).unlink()
    os.mkfifo(dest / shard)
    refused(tmp_path, dest, PathNotAllowedError, shard, "not a regular file")


# ---------------------------------------------------------------- 6: pickle
@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "last.ckpt"])
def test_pickle_only_checkpoint_refused_and_payload_never_runs(tmp_path, name):
    sentinel = tmp_path / "SENTINEL"
    folder = folder_with_file(tmp_path / "m", malicious_pickle_bytes(sentinel), name=name)
    refused(tmp_path, folder, UnsafeFormatError, name, "pickle checkpoint refused")
    assert not sentinel.exists()


def test_pickle_optin_refuses_payload_without_fallback(tmp_path, monkeypatch):
    sentinel = tmp_path / "SENTINEL"
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(malicious_pickle_bytes(sentinel))
    calls = []
    monkeypatch.undo()  # the opt-in is allowed to call torch.load, with weights_only=True only
    original = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return original(*args, **kwargs)
    monkeypatch.setattr(torch, "load", recording_load)
    before = snapshot(tmp_path)
    with pytest.raises(UnsafeFormatError) as info:
        load_pickle_state_dict(path)
    assert str(path) in str(info.value)
    assert calls == [True]  # one call, weights_only=True, no second try
    assert not sentinel.exists() and snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["pickle", "zip"])
def test_pickle_bytes_named_safetensors(tmp_path, kind):
    sentinel = tmp_path / "SENTINEL"
    payload = malicious_pickle_bytes(sentinel)
    if kind == "zip":
        import zipfile
        zpath = tmp_path / "archive.zip"
        with zipfile.ZipFile(zpath, "w") as archive:
            archive.writestr("archive/data.pkl", payload)
        payload = zpath.read_bytes()
        zpath.unlink()
    folder = folder_with_file(tmp_path / "m", payload)
    err = refused(tmp_path, folder, CheckpointFormatError, "model.safetensors", f"looks like a {kind}"
                  if kind == "pickle" else "zip archive")
    assert "refused without loading" in str(err)
    assert not sentinel.exists()


# ---------------------------------------------------------------- 7: config.json
def test_config_missing(tmp_path):
    dest = write_model(tmp_path / "m", tiny_tensors())
    (dest / "config.json").unlink()
    refused(tmp_path, dest, ConfigError, "config.json", "missing")


@pytest.mark.parametrize("text,reason", [("{not json", "not valid JSON"), ("[1, 2]", "JSON object"),
                                         ('{"a": 1, "a": 2}', "duplicate key"), ("\xff", "not valid JSON")])
def test_config_malformed(tmp_path, text, reason):
    dest = write_model(tmp_path / "m", tiny_tensors())
    (dest / "config.json").write_text(text)
    refused(tmp_path, dest, ConfigError, "config.json", reason)


@pytest.mark.parametrize("extra", [{"auto_map": {"AutoModelForCausalLM": "modeling_evil.EvilModel"}},
                                   {"trust_remote_code": True},
                                   {"text_config": {"auto_map": {"AutoConfig": "x.Y"}}}])
def test_config_asking_for_remote_code(tmp_path, extra):
    dest = write_model(tmp_path / "m", tiny_tensors())
    (dest / "config.json").write_text(json.dumps({**TINY_CONFIG, **extra}))
    (dest / "modeling_evil.py").write_text(f"open({str(tmp_path / 'SENTINEL')!r}, 'w')\n")
    refused(tmp_path, dest, UnsafeFormatError, "config.json", "remote code")
    assert not (tmp_path / "SENTINEL").exists()


def test_every_refusal_is_a_workbench_error():
    for cls in (CheckpointFormatError, ConfigError, PathNotAllowedError, UnsafeFormatError):
        assert issubclass(cls, DeltaWorkbenchError)


def test_deeply_nested_json_is_a_named_error_not_a_recursion_crash(tmp_path):
    deep = b"{" + b'"a":{' * 5000 + b"}" * 5001
    folder = folder_with_file(tmp_path / "m", safetensors_bytes(deep, b""))
    refused(tmp_path, folder, CheckpointFormatError, "model.safetensors", "nested too deeply")
    (folder / "config.json").write_bytes(deep)
    refused(tmp_path, folder, ConfigError, "config.json", "nested too deeply")
