"""The artifact format: what is on disk, integrity checks, wrong bases, atomic writes."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from engine.compress import Artifact, compress, decompress, rebuild_state_dict
from engine.compress.artifact import MANIFEST_NAME, TENSORS_NAME
from engine.errors import ArtifactError, ExportError, IncompatibleModelsError
from engine.io import ModelFolder
from engine.io.header import read_header
from tests.compress.helpers import CONFIG, folder_size, make_pair


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("art")
    base, ft, base_t, ft_t = make_pair(root)
    art = root / "art"
    result = compress(base, ft, art, "delta_dct", ratio=16, device="cpu")
    return {"root": root, "base": base, "ft": ft, "art": art, "result": result, "ft_t": ft_t}


def copy_of(made, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(made["art"], dst)
    return dst


def test_layout_on_disk(made):
    art = made["art"]
    names = sorted(str(p.relative_to(art)) for p in art.rglob("*") if p.is_file())
    assert names == ["delta.safetensors", "manifest.json"]  # config/tokenizer: same as the base's
    manifest = json.loads((art / MANIFEST_NAME).read_text())
    assert manifest["method"] == "delta_dct" and manifest["target_ratio"] == 16
    assert set(manifest["base"]["files"]["model.safetensors"]) >= {"size", "mtime_ns", "header_sha256", "sha256"}
    assert manifest["files"][TENSORS_NAME]["size"] == (art / TENSORS_NAME).stat().st_size
    header = read_header(art / TENSORS_NAME)
    assert set(header.entries) == {"offsets", "vectors", "payload"}
    assert header.entries["vectors"].shape == (512,) and header.entries["vectors"].dtype_name == "F16"
    # the ratio counts every byte of the folder, manifest included
    assert made["result"].bytes == folder_size(art)
    assert Artifact(art).ratio == pytest.approx(2 * made["result"].delta_entries / folder_size(art))
    # no staging folder or temporary file left beside it
    assert not [p for p in art.parent.iterdir() if ".staging-" in p.name]


def test_side_files_are_deduplicated_against_the_base_or_embedded(made, tmp_path):
    manifest = json.loads((made["art"] / MANIFEST_NAME).read_text())
    assert manifest["side_files"]["from_base"] == ["config.json", "tokenizer_config.json"]
    embedded = tmp_path / "embedded"
    compress(made["base"], made["ft"], embedded, "svd", ratio=16, side_files="embed", device="cpu")
    stored = json.loads((embedded / MANIFEST_NAME).read_text())["side_files"]["stored"]
    assert stored == ["config.json", "tokenizer_config.json"]
    assert (embedded / "files" / "config.json").read_bytes() == (made["ft"] / "config.json").read_bytes()


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "extra", "manifest_garbage",
                                    "manifest_missing", "offsets"])
def test_corrupt_artifact_is_refused(made, tmp_path, damage):
    art = copy_of(made, tmp_path)
    target = art / TENSORS_NAME
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[-5] ^= 0x40
        target.write_bytes(bytes(data))
        match = "sha256 differs"
    elif damage == "truncate":
        with open(target, "r+b") as handle:
            handle.truncate(target.stat().st_size - 7)
        match = "truncated or altered"
    elif damage == "delete":
        target.unlink()
        match = "missing"
    elif damage == "extra":
        (art / "notes.txt").write_text("hello")
        match = "unexpected file"
    elif damage == "manifest_garbage":
        (art / MANIFEST_NAME).write_text("{not json")
        match = "corrupt"
    elif damage == "manifest_missing":
        (art / MANIFEST_NAME).unlink()
        match = "manifest.json missing"
    else:  # a consistent file whose section table lies (sha256 updated to match)
        manifest = json.loads((art / MANIFEST_NAME).read_text())
        header = read_header(target)
        data = bytearray(target.read_bytes())
        off = header.data_start + header.entries["offsets"].begin + 4
        data[off:off + 4] = (10 ** 8).to_bytes(4, "little")
        target.write_bytes(bytes(data))
        import hashlib

        manifest["files"][TENSORS_NAME]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
        (art / MANIFEST_NAME).write_text(json.dumps(manifest))
        match = "offsets are inconsistent"
    with pytest.raises(ArtifactError, match=match):
        decompress(art, made["base"], tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


def test_corrupt_section_is_an_error_not_a_wrong_model(made, tmp_path):
    """Bytes changed inside a section (with a matching sha256) fail cleanly at decode."""
    import hashlib

    art = copy_of(made, tmp_path)
    target = art / TENSORS_NAME
    header = read_header(target)
    data = bytearray(target.read_bytes())
    payload = header.data_start + header.entries["payload"].begin
    data[payload] = 0  # patch size 0 in the first section
    target.write_bytes(bytes(data))
    manifest = json.loads((art / MANIFEST_NAME).read_text())
    manifest["files"][TENSORS_NAME]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    (art / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="bad patch size"):
        rebuild_state_dict(art, made["base"], device="cpu")


def test_wrong_base_is_refused(made, tmp_path):
    # same layout, other weights
    other = tmp_path / "other"
    with ModelFolder(made["base"]) as base:
        from engine.io import ModelWriter

        with ModelWriter(other, config=dict(base.config)) as w:
            for name in base.tensor_names:
                t = base.get_tensor(name)
                w.add_tensor(name, t + 1e-3 if name.endswith("q_proj.weight") else t)
    with pytest.raises(ArtifactError, match="same layout but other weights"):
        decompress(made["art"], other, tmp_path / "out", device="cpu")
    # another layout
    small = tmp_path / "small"
    with ModelWriter(small, config=dict(CONFIG)) as w:
        w.add_tensor("model.norm.weight", torch.ones(256))
    with pytest.raises(ArtifactError, match="tensor names/shapes differ"):
        decompress(made["art"], small, tmp_path / "out", device="cpu")
    # a base whose config/tokenizer copies differ from the referenced ones
    edited = tmp_path / "edited"
    shutil.copytree(made["base"], edited)
    (edited / "tokenizer_config.json").write_text('{"model_max_length": 99}')
    with pytest.raises(ArtifactError, match="differ from the ones the artifact was made against"):
        decompress(made["art"], edited, tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


def test_incompatible_pair_is_refused_before_writing(made, tmp_path):
    small = tmp_path / "small"
    from engine.io import ModelWriter

    with ModelWriter(small, config=dict(CONFIG)) as w:
        w.add_tensor("model.norm.weight", torch.ones(256))
    with pytest.raises(IncompatibleModelsError):
        compress(made["base"], small, tmp_path / "art", "svd", ratio=8, device="cpu")
    assert not (tmp_path / "art").exists()


def test_destination_rules_and_no_leftovers(made, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(ExportError, match="not empty"):
        compress(made["base"], made["ft"], busy, "svd", ratio=8, device="cpu")
    with pytest.raises(ExportError, match="overlap"):
        compress(made["base"], made["ft"], made["ft"] / "inside", "svd", ratio=8, device="cpu")
    assert sorted(os.listdir(tmp_path)) == ["busy"]


def test_failure_mid_compression_leaves_nothing(made, tmp_path, monkeypatch):
    from engine.compress.methods import svd

    calls = {"n": 0}
    real = svd.encode

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(svd, "encode", flaky)
    with pytest.raises(KeyboardInterrupt):
        compress(made["base"], made["ft"], tmp_path / "art", "svd", ratio=8, device="cpu")
    assert os.listdir(tmp_path) == []


def test_non_finite_fine_tune_is_refused_naming_the_tensor(made, tmp_path):
    from engine.errors import NonFiniteError
    from engine.io import ModelWriter

    bad = tmp_path / "bad"
    with ModelFolder(made["ft"]) as ft, ModelWriter(bad, config=dict(ft.config)) as w:
        for name in ft.tensor_names:
            t = ft.get_tensor(name).clone()
            if name.endswith("up_proj.weight"):
                t[3, 4] = float("nan")
            w.add_tensor(name, t)
    with pytest.raises(NonFiniteError, match="up_proj"):
        compress(made["base"], bad, tmp_path / "art", "svd", ratio=8, device="cpu")
    assert not (tmp_path / "art").exists()
