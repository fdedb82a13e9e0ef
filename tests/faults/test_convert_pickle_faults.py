"""convert-pickle, the one door for pickle checkpoints: whatever it refuses is one line naming
the file (and tensor), exit 2, the payload never runs, and nothing is written."""

from __future__ import annotations

import json

import pytest
import torch

from engine.__main__ import main
from tests.io.builders import TINY_CONFIG, snapshot, staging_leftovers
from tests.io.test_pickle_optin import _CreatesSentinel, malicious_pickle_bytes


def _folder(path, files: dict, config=True):
    path.mkdir(parents=True)
    if config:
        (path / "config.json").write_text(json.dumps(TINY_CONFIG))
    for name, content in files.items():
        if isinstance(content, bytes):
            (path / name).write_bytes(content)
        else:
            torch.save(content, path / name)
    return path


def refused(capsys, tmp_path, argv, *needles):
    before = snapshot(tmp_path)
    assert main(["convert-pickle", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    assert snapshot(tmp_path) == before and staging_leftovers(tmp_path) == []
    return err


@pytest.mark.parametrize("via_torch_save", [False, True])
def test_a_code_payload_is_refused_and_never_runs(tmp_path, capsys, via_torch_save):
    sentinel = tmp_path / "PWNED"
    ckpt = tmp_path / "ckpt"
    if via_torch_save:
        _folder(ckpt, {"pytorch_model.bin": {"w": _CreatesSentinel(sentinel)}})
    else:
        _folder(ckpt, {"pytorch_model.bin": malicious_pickle_bytes(sentinel)})
    refused(capsys, tmp_path, [str(ckpt / "pytorch_model.bin"), "--out", str(tmp_path / "out")],
            "pytorch_model.bin", "weights-only")
    assert not sentinel.exists()


@pytest.mark.parametrize("files, config, needles", [
    ({"pytorch_model.bin": {"w": torch.ones(2), "step": 3}}, True, ["entry 'step' is int, not a tensor"]),
    ({"pytorch_model.bin": [torch.ones(2)]}, True, ["expected a non-empty dict of tensors, found list"]),
    ({"pytorch_model.bin": {"state_dict": {"w": torch.ones(2)}}}, True, ["entry 'state_dict' is dict"]),
    ({"pytorch_model.bin": {"w": torch.ones(2).to_sparse()}}, True, ["tensor 'w'", "sparse", "no safetensors form"]),
    ({"pytorch_model.bin": {"w": torch.ones(2)}}, False, ["config.json", "no config.json beside the checkpoint"]),
    ({"pytorch_model.bin": b"not a pickle at all"}, True, ["pytorch_model.bin", "weights-only"]),
], ids=["non_tensor", "not_a_dict", "nested", "sparse", "no_config", "garbage"])
def test_what_is_not_a_flat_dense_state_dict_is_refused(tmp_path, capsys, files, config, needles):
    ckpt = _folder(tmp_path / "ckpt", files, config=config)
    refused(capsys, tmp_path, [str(ckpt / "pytorch_model.bin"), "--out", str(tmp_path / "out")], *needles)


def test_shards_must_be_one_checkpoint(tmp_path, capsys):
    a = _folder(tmp_path / "a", {"p1.bin": {"w": torch.ones(2)}, "p2.bin": {"w": torch.zeros(2)}})
    b = _folder(tmp_path / "b", {"p3.bin": {"v": torch.ones(2)}})
    refused(capsys, tmp_path, [str(a / "p1.bin"), str(a / "p2.bin"), "--out", str(tmp_path / "out")],
            "p2.bin", "tensor 'w'", "two shards")
    refused(capsys, tmp_path, [str(a / "p1.bin"), str(b / "p3.bin"), "--out", str(tmp_path / "out")],
            "p3.bin", "one folder")


def test_a_hostile_config_or_destination_is_refused(tmp_path, capsys):
    ckpt = _folder(tmp_path / "ckpt", {"pytorch_model.bin": {"w": torch.ones(2)}}, config=False)
    (ckpt / "config.json").write_text(json.dumps({**TINY_CONFIG, "auto_map": {"AutoModel": "x.Model"}}))
    refused(capsys, tmp_path, [str(ckpt / "pytorch_model.bin"), "--out", str(tmp_path / "out")],
            "config.json", "auto_map")
    (ckpt / "config.json").write_text(json.dumps(TINY_CONFIG))
    refused(capsys, tmp_path, [str(ckpt / "pytorch_model.bin"), "--out", str(ckpt / "inside")],
            "inside input model folder")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    refused(capsys, tmp_path, [str(ckpt / "pytorch_model.bin"), "--out", str(tmp_path / "full")],
            "not empty")
