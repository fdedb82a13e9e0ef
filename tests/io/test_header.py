"""Our own safetensors header parser agrees with safetensors on good files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from engine.errors import CheckpointFormatError
from engine.io.header import DTYPES, loads_strict_json, looks_like_pickle_or_zip, read_header
from tests.io.builders import f32_entry, safetensors_bytes


def test_parses_a_file_written_by_safetensors(tmp_path):
    tensors = {"a": torch.zeros(3, 2), "b": torch.ones(5, dtype=torch.bfloat16),
               "c": torch.arange(4, dtype=torch.int8), "s": torch.tensor(1.0)}
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    header = read_header(path)
    assert header.metadata == {"format": "pt"}
    assert set(header.entries) == set(tensors)
    for name, t in tensors.items():
        entry = header.entries[name]
        assert entry.shape == tuple(t.shape) and entry.dtype == t.dtype
        assert entry.nbytes == t.numel() * t.element_size()
    assert header.file_size == path.stat().st_size
    assert len(header.header_sha256) == 64
    # order is by data offset and the offsets tile the data area
    ends = [header.entries[n].end for n in header.order]
    assert ends[-1] == header.file_size - header.data_start


def test_every_known_dtype_maps_to_its_itemsize():
    for name, (dtype, itemsize) in DTYPES.items():
        assert torch.empty(0, dtype=dtype).element_size() == itemsize, name


def test_empty_header_object_is_a_valid_empty_file(tmp_path):
    path = tmp_path / "e.safetensors"
    path.write_bytes(safetensors_bytes(b"{}"))
    assert read_header(path).entries == {}


def test_padding_spaces_after_json_are_accepted(tmp_path):
    path = tmp_path / "p.safetensors"
    path.write_bytes(safetensors_bytes(b'{"w":' + b'{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}   ',
                                       b"\0\0\0\0"))
    assert read_header(path).entries["w"].shape == (1,)


def test_bool_is_not_a_dimension(tmp_path):
    path = tmp_path / "b.safetensors"
    path.write_bytes(safetensors_bytes({"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}},
                                       b"\0" * 4))
    with pytest.raises(CheckpointFormatError, match="shape"):
        read_header(path)


def test_extra_entry_fields_refused(tmp_path):
    entry = f32_entry(0, [1]) | {"quant": "x"}
    path = tmp_path / "x.safetensors"
    path.write_bytes(safetensors_bytes({"w": entry}, b"\0" * 4))
    with pytest.raises(CheckpointFormatError, match="exactly"):
        read_header(path)


def test_strict_json_and_magic_helpers():
    with pytest.raises(ValueError):
        loads_strict_json('{"a": 1, "a": 2}')
    with pytest.raises(ValueError):
        loads_strict_json('{"a": NaN}')
    assert loads_strict_json('{"a": {"b": 1}}') == {"a": {"b": 1}}
    assert looks_like_pickle_or_zip(b"\x80\x04\x95") == "a pickle stream"
    assert "zip" in looks_like_pickle_or_zip(b"PK\x03\x04rest")
    assert looks_like_pickle_or_zip(b"\x80\x00\x00\x00") is None  # a header length of 128
