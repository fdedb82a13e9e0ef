"""The explicit pickle opt-in: weights_only=True only, never a fallback."""

from __future__ import annotations

import pickle

import pytest
import torch

from engine.errors import CheckpointFormatError, UnsafeFormatError
from engine.io.pickle_optin import load_pickle_state_dict


class _CreatesSentinel:
    """Unpickling this calls open(sentinel, "w"), creating a file: a harmless stand-in for code."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


def malicious_pickle_bytes(sentinel) -> bytes:
    return pickle.dumps({"weight": _CreatesSentinel(sentinel)}, protocol=2)


def test_plain_state_dict_loads(tmp_path):
    state = {"a": torch.randn(3, 2), "b": torch.arange(4)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    loaded = load_pickle_state_dict(tmp_path / "pytorch_model.bin")
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


@pytest.mark.parametrize("via_torch_save", [False, True])
def test_payload_refused_and_never_runs(tmp_path, via_torch_save):
    sentinel = tmp_path / "PWNED"
    path = tmp_path / "pytorch_model.bin"
    if via_torch_save:  # zip container with the payload inside data.pkl
        torch.save({"weight": _CreatesSentinel(sentinel)}, path)
    else:
        path.write_bytes(malicious_pickle_bytes(sentinel))
    assert not sentinel.exists()
    with pytest.raises(UnsafeFormatError) as info:
        load_pickle_state_dict(path)
    assert str(path) in str(info.value) and "weights-only" in str(info.value)
    assert not sentinel.exists()


def test_non_tensor_content_refused(tmp_path):
    torch.save({"a": 1}, tmp_path / "x.pt")
    with pytest.raises(CheckpointFormatError, match="not a tensor"):
        load_pickle_state_dict(tmp_path / "x.pt")
    with pytest.raises(CheckpointFormatError, match="not found"):
        load_pickle_state_dict(tmp_path / "absent.pt")
