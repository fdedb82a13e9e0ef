"""ModelFolder on good folders: inventory, lazy loading, finiteness, fingerprints."""

from __future__ import annotations

import json
import math

import pytest
import torch

from engine.errors import CheckpointFormatError, NonFiniteError
from engine.io import ModelFolder
from tests.io.builders import TINY_CONFIG, folder_with_file, tiny_tensors, write_model


def test_inventory_matches_what_was_written(tmp_path):
    tensors = tiny_tensors(torch.bfloat16)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].float()  # mixed dtypes
    dest = write_model(tmp_path / "m", tensors, max_shard_bytes=300)
    with ModelFolder(dest) as mf:
        assert mf.config == TINY_CONFIG
        assert sorted(mf.tensor_names) == sorted(tensors)
        assert len(mf.shard_files) > 1 and all(p.parent == dest.resolve() for p in mf.shard_files)
        assert mf.num_parameters == sum(t.numel() for t in tensors.values())
        assert mf.total_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
        info = mf.info("model.layers.1.mlp.up_proj.weight")
        assert info.shape == (16, 8) and info.dtype == torch.bfloat16 and info.nbytes == 16 * 8 * 2
        assert info.numel == 128 and info.file in mf.shard_files
        assert mf.info("model.norm.weight").dtype == torch.float32
        loaded = dict(mf.iter_tensors())
        assert all(torch.equal(loaded[n], tensors[n]) for n in tensors)
        assert "lm_head.weight" in mf and "nope" not in mf
        with pytest.raises(KeyError, match="nope"):
            mf.info("nope")


def test_tensor_names_follow_shard_then_offset_order(tmp_path):
    dest = write_model(tmp_path / "m", tiny_tensors(), max_shard_bytes=300)
    with ModelFolder(dest) as mf:
        files = [mf.info(n).file.name for n in mf.tensor_names]
        assert files == sorted(files)


def test_fingerprints_are_stable_and_follow_the_header(tmp_path):
    dest = write_model(tmp_path / "m", {"w": torch.ones(4)})
    first = ModelFolder(dest).file_fingerprints()
    assert ModelFolder(dest).file_fingerprints() == first
    write_model(tmp_path / "n", {"w": torch.ones(2, 2)})  # same byte count, other shape
    (dest / "model.safetensors").write_bytes((tmp_path / "n" / "model.safetensors").read_bytes())
    second = ModelFolder(dest).file_fingerprints()["model.safetensors"]
    assert second["header_sha256"] != first["model.safetensors"]["header_sha256"]


def test_check_finite_names_tensor_and_counts(tmp_path):
    tensors = tiny_tensors()
    bad = tensors["model.layers.0.mlp.up_proj.weight"]
    bad[0, 0] = math.nan
    bad[1, :3] = math.inf
    tensors["model.norm.weight"][2] = -math.inf
    dest = write_model(tmp_path / "m", tensors)
    mf = ModelFolder(dest)
    counts = mf.nonfinite_counts()
    assert counts == {"model.layers.0.mlp.up_proj.weight": {"nan": 1, "inf": 3},
                      "model.norm.weight": {"nan": 0, "inf": 1}}
    with pytest.raises(NonFiniteError) as info:
        mf.check_finite()
    msg = str(info.value)
    assert "model.safetensors" in msg and "model.layers.0.mlp.up_proj.weight" in msg
    assert "1 NaN and 3 Inf" in msg and "model.norm.weight" in msg
    with pytest.raises(NonFiniteError):
        ModelFolder(dest, check_finite=True)
    mf.check_finite(["model.embed_tokens.weight"])  # a clean subset passes


def test_check_finite_ignores_integer_tensors(tmp_path):
    """Integer and bool tensors have no NaN/Inf: extreme values in them are never counted,
    while the float tensors beside them still are."""
    ids = torch.tensor([torch.iinfo(torch.int64).min, -1, 0, torch.iinfo(torch.int64).max])
    tensors = {"ids": ids, "mask": torch.tensor([True, False]), "w": torch.ones(2)}
    dest = write_model(tmp_path / "m", tensors)
    with ModelFolder(dest, check_finite=True) as mf:
        assert mf.nonfinite_counts() == {}
        assert torch.equal(mf.read_tensor("ids"), ids)
    tensors["w"] = torch.tensor([1.0, float("nan")])
    with pytest.raises(NonFiniteError, match="tensor 'w'"):
        ModelFolder(write_model(tmp_path / "bad", tensors), check_finite=True)


def test_both_single_file_and_index_is_ambiguous(tmp_path):
    dest = write_model(tmp_path / "m", tiny_tensors(), max_shard_bytes=300)
    first_shard = ModelFolder(dest).shard_files[0]
    (dest / "model.safetensors").write_bytes(first_shard.read_bytes())
    with pytest.raises(CheckpointFormatError, match="ambiguous"):
        ModelFolder(dest)


def test_bare_safetensors_with_other_name_is_refused_with_a_hint(tmp_path):
    folder = folder_with_file(tmp_path / "m", b"irrelevant", name="weights.safetensors")
    with pytest.raises(CheckpointFormatError, match="weights.safetensors.*rename"):
        ModelFolder(folder)


def test_folder_without_weights(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(TINY_CONFIG))
    with pytest.raises(CheckpointFormatError, match="no weights"):
        ModelFolder(tmp_path / "m")


def test_missing_folder_and_file_instead_of_folder(tmp_path):
    with pytest.raises(CheckpointFormatError, match="not found"):
        ModelFolder(tmp_path / "absent")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointFormatError, match="not a folder"):
        ModelFolder(tmp_path / "file")


def test_file_replaced_after_open_is_detected(tmp_path):
    dest = write_model(tmp_path / "m", {"w": torch.ones(4)})
    mf = ModelFolder(dest)
    write_model(tmp_path / "n", {"w": torch.ones(2, 3)})
    (dest / "model.safetensors").write_bytes((tmp_path / "n" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointFormatError, match="changed"):
        mf.get_tensor("w")
