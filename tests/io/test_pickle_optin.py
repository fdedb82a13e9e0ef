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


# ---------------------------------------------------------------- the door: convert-pickle
def _pickle_folder(folder, tensors, *, shards=1):
    """A pickle checkpoint as transformers wrote them (pytorch_model.bin or its shards) beside
    config.json and a tokenizer config."""
    import json

    from tests.io.builders import TINY_CONFIG

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    names = list(tensors)
    paths = []
    for i in range(shards):
        part = {n: tensors[n] for n in names[i::shards]}
        path = folder / ("pytorch_model.bin" if shards == 1 else f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin")
        torch.save(part, path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("shards", [1, 2])
def test_convert_pickle_writes_the_same_tensors_as_safetensors(tmp_path, capsys, shards):
    import json

    from engine.__main__ import main
    from engine.io import ModelFolder
    from tests.io.builders import TINY_CONFIG, tiny_tensors

    tensors = tiny_tensors(torch.bfloat16)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]  # tied: one storage, two names
    tensors["position_ids"] = torch.arange(8)
    paths = _pickle_folder(tmp_path / "ckpt", tensors, shards=shards)
    assert main(["convert-pickle", *map(str, paths), "--out", str(tmp_path / "out"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == {"out": str(tmp_path / "out"), "tensors": len(tensors)}
    with ModelFolder(tmp_path / "out") as folder:
        assert set(folder.tensor_names) == set(tensors)
        for name, tensor in tensors.items():
            got = folder.read_tensor(name)
            assert got.dtype == tensor.dtype and torch.equal(got, tensor), name
        assert folder.config == TINY_CONFIG
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text()) == {"model_max_length": 64}
    manifest = json.loads((tmp_path / "out" / "delta_workbench_manifest.json").read_text())
    assert manifest["converted_from"] == [p.name for p in paths]
    assert not list((tmp_path / "out").glob("*.bin"))
