"""ModelFolder.read_tensor: bytes read at the validated offsets (no memory map), same tensors."""

from __future__ import annotations

import os

import pytest
import torch

from engine.errors import CheckpointFormatError
from engine.io import ModelFolder
from tests.io.builders import tiny_tensors, write_model


@pytest.mark.parametrize("max_shard_bytes", [2**30, 200])
def test_read_tensor_equals_get_tensor(tmp_path, max_shard_bytes):
    tensors = tiny_tensors(torch.bfloat16)
    tensors["scalar"] = torch.tensor(3.5)
    tensors["empty"] = torch.zeros(0, 3)
    dest = write_model(tmp_path / "m", tensors, max_shard_bytes=max_shard_bytes)
    with ModelFolder(dest) as mf:
        for name, expected in tensors.items():
            got = mf.read_tensor(name)
            assert got.dtype == expected.dtype and got.shape == expected.shape
            assert torch.equal(got, expected) and torch.equal(got, mf.get_tensor(name))
            got.zero_()  # a private copy: the next read is unaffected
            assert torch.equal(mf.read_tensor(name), expected)


def test_read_tensor_refuses_a_file_changed_after_opening(tmp_path):
    dest = write_model(tmp_path / "m", tiny_tensors())
    mf = ModelFolder(dest)
    path = dest / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-8])  # truncated behind the reader's back
    os.utime(path, ns=(1, 1))
    with pytest.raises(CheckpointFormatError, match="changed since it was opened"):
        mf.read_tensor("model.norm.weight")
    mf.close()
