"""Hostile side files (issue 19, items 1 and 4): a model folder's tokenizer, generation and chat
files never make transformers run code, never lead outside the folder, are never carried into
an output (merge, compressed artifact, decompressed folder) when unsafe, and a broken one is a
one-line named error.

Each case asserts the error type, that the message names the file, that nothing was written,
and, where the folder carries a Python payload, that the payload never ran.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from engine.errors import ArtifactError, ConfigError, PathNotAllowedError, UnsafeFormatError
from engine.evaluate.loading import load_model_folder, load_tokenizer
from engine.io import ModelFolder
from tests.faults.refusal import assert_refused
from tests.io.builders import TINY_CONFIG, tiny_tensors, write_model

AUTO_MAP = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}


@pytest.fixture(scope="module")
def tokenizer_bytes(tmp_path_factory) -> dict[str, bytes]:
    from engine.evaluate.tokenizer import tokenizer_files

    return tokenizer_files(tmp_path_factory.mktemp("tok"))


def model_with_tokenizer(root: Path, tokenizer_bytes: dict[str, bytes], name: str = "m") -> Path:
    """A tiny model folder carrying the zoo's tokenizer files and a Python payload that, if
    ever imported, leaves ``root/SENTINEL`` behind."""
    folder = write_model(root / name, tiny_tensors())
    for file, data in tokenizer_bytes.items():
        (folder / file).write_bytes(data)
    (folder / "tokenization_evil.py").write_text(
        f"open({str(root / 'SENTINEL')!r}, 'w').close()\nclass EvilTokenizer: pass\n")
    return folder


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**data, **changes}))


def refused(tmp_path, action, error_type, *needles):
    """Run ``action``; assert the error type, the named things, one line, no trace on disk,
    and that no payload ran."""
    error = assert_refused(tmp_path, action, error_type, *needles)
    assert not (tmp_path / "SENTINEL").exists()
    return error


# ---------------------------------------------------------------- item 1: no code from the folder
@pytest.mark.parametrize("file,changes", [
    ("tokenizer_config.json", {"auto_map": AUTO_MAP}),
    ("tokenizer_config.json", {"auto_map": ["tokenization_evil.EvilTokenizer", None]}),  # legacy form
    ("tokenizer_config.json", {"tokenizer_class": "EvilTokenizer"}),
    ("special_tokens_map.json", {"extra": {"auto_map": AUTO_MAP}}),
    ("generation_config.json", {"auto_map": {"AutoConfig": "tokenization_evil.X"}}),
    ("config.json", {"tokenizer_class": "EvilTokenizerFast"}),
], ids=["auto_map", "auto_map_list", "unknown_class", "nested_auto_map", "generation_config",
        "config_tokenizer_class"])
def test_tokenizer_asking_for_folder_code_is_refused(tmp_path, tokenizer_bytes, file, changes):
    folder = model_with_tokenizer(tmp_path, tokenizer_bytes)
    edit_json(folder / file, **changes)
    refused(tmp_path, lambda: load_tokenizer(folder), UnsafeFormatError, str(folder / file),
            next(iter(changes)) if file != "special_tokens_map.json" else "auto_map")


def test_a_known_tokenizer_class_loads_an_unknown_fast_one_is_refused(tmp_path, tokenizer_bytes):
    from engine.evaluate.tokenizer import build_tokenizer

    folder = model_with_tokenizer(tmp_path, tokenizer_bytes)
    edit_json(folder / "tokenizer_config.json", tokenizer_class="PreTrainedTokenizerFast")
    assert load_tokenizer(folder)("ab")["input_ids"] == build_tokenizer()("ab")["input_ids"]
    edit_json(folder / "tokenizer_config.json", tokenizer_class="EvilTokenizerFast")
    refused(tmp_path, lambda: load_tokenizer(folder), UnsafeFormatError, "tokenizer_config.json",
            "EvilTokenizerFast")


@pytest.mark.parametrize("where", ["top", "nested"])
def test_attention_implementation_naming_a_hub_kernel_is_refused(tmp_path, where):
    folder = write_model(tmp_path / "m", tiny_tensors())
    edit_json(folder / "config.json", attn_implementation="sdpa")
    assert ModelFolder(folder).config["attn_implementation"] == "sdpa"  # built-in: fine
    kernel = "kernels-community/flash-attn"
    edit_json(folder / "config.json", **({"attn_implementation": kernel} if where == "top"
                                         else {"text_config": {"_attn_implementation": kernel}}))
    refused(tmp_path, lambda: ModelFolder(folder), UnsafeFormatError, "config.json", kernel)
    refused(tmp_path, lambda: load_model_folder(folder), UnsafeFormatError, "config.json", kernel)


# ---------------------------------------------------------------- item 4: side files are checked
@pytest.mark.parametrize("kind", ["symlink_out", "directory"])
def test_tokenizer_file_leading_outside_or_not_a_file(tmp_path, tokenizer_bytes, kind):
    folder = model_with_tokenizer(tmp_path, tokenizer_bytes)
    os.replace(folder / "tokenizer.json", folder / "tok.blob")
    os.symlink("tok.blob", folder / "tokenizer.json")
    assert load_tokenizer(folder).eos_token_id is not None  # a symlink inside the folder is fine
    (folder / "tokenizer.json").unlink()
    if kind == "symlink_out":
        secret = tmp_path / "secret.txt"
        secret.write_text("root:x:0:0\n")
        os.symlink(secret, folder / "tokenizer.json")
        reason = "outside the model folder"
    else:
        (folder / "tokenizer.json").mkdir()
        reason = "not a regular file"
    refused(tmp_path, lambda: load_tokenizer(folder), PathNotAllowedError, "tokenizer.json", reason)


@pytest.mark.parametrize("payload,reason", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe\x00garbage", "not UTF-8"),
    (b'{"version": "1.0", "model": {"type": "Nope"}}', "cannot be loaded"),
    (b'{"a": 1, "a": 2}', "duplicate key"),
], ids=["syntax", "binary", "wrong_structure", "duplicate_key"])
def test_garbage_tokenizer_json_is_a_one_line_config_error(tmp_path, tokenizer_bytes, payload, reason):
    folder = model_with_tokenizer(tmp_path, tokenizer_bytes)
    (folder / "tokenizer.json").write_bytes(payload)
    refused(tmp_path, lambda: load_tokenizer(folder), ConfigError, str(folder), "tokenizer.json", reason)


# ---------------------------------------------------------------- outputs never carry them
def _merge(source: Path, out: Path):
    from engine.merge.executor import run_merge
    from engine.recipe import parse_recipe

    recipe = parse_recipe({"merge_method": "linear",
                           "models": [{"model": str(source), "parameters": {"weight": 1.0}}]})
    return run_merge(recipe, out, device="cpu")


def test_merge_does_not_copy_a_tokenizer_file_from_outside(tmp_path, tokenizer_bytes):
    folder = model_with_tokenizer(tmp_path, tokenizer_bytes)
    (tmp_path / "secret.json").write_text('{"secret": 1}')
    (folder / "tokenizer_config.json").unlink()
    os.symlink(tmp_path / "secret.json", folder / "tokenizer_config.json")
    refused(tmp_path, lambda: _merge(folder, tmp_path / "out"), PathNotAllowedError,
            "tokenizer_config.json", "outside the model folder")


def test_merge_does_not_carry_a_tokenizer_config_with_auto_map(tmp_path, tokenizer_bytes):
    folder = model_with_tokenizer(tmp_path, tokenizer_bytes)
    edit_json(folder / "tokenizer_config.json", auto_map=AUTO_MAP)
    refused(tmp_path, lambda: _merge(folder, tmp_path / "out"), UnsafeFormatError,
            "tokenizer_config.json", "auto_map")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from engine.compress import compress
    from tests.compress.helpers import make_pair

    root = tmp_path_factory.mktemp("art")
    base, ft, _, _ = make_pair(root)
    compress(base, ft, root / "art", "delta_dct", ratio=16, device="cpu")
    return {"base": base, "ft": ft, "art": root / "art"}


def test_compress_refuses_a_fine_tune_whose_side_file_asks_for_code(tmp_path, artifact):
    from engine.compress import compress

    ft = tmp_path / "ft"
    shutil.copytree(artifact["ft"], ft)
    (ft / "generation_config.json").write_text(json.dumps({"auto_map": AUTO_MAP}))
    refused(tmp_path, lambda: compress(artifact["base"], ft, tmp_path / "out", "delta_dct", ratio=16,
                                       device="cpu"),
            UnsafeFormatError, "generation_config.json", "auto_map")


def test_compress_refuses_a_side_file_leading_outside(tmp_path, artifact):
    from engine.compress import compress

    ft = tmp_path / "ft"
    shutil.copytree(artifact["ft"], ft)
    (tmp_path / "elsewhere.json").write_text("{}")
    os.symlink(tmp_path / "elsewhere.json", ft / "special_tokens_map.json")
    refused(tmp_path, lambda: compress(artifact["base"], ft, tmp_path / "out", "delta_dct", ratio=16,
                                       device="cpu"),
            PathNotAllowedError, "special_tokens_map.json", "outside the model folder")


def _smuggle(art: Path, name: str, data: bytes) -> None:
    """Store ``name`` in the artifact as a side file, with a manifest that vouches for it."""
    (art / "files").mkdir(exist_ok=True)
    (art / "files" / name).write_bytes(data)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["files"][f"files/{name}"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest["side_files"]["stored"] = [*manifest["side_files"]["stored"], name]
    (art / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("name,data,error_type,reason", [
    ("modeling_evil.py", b"import os\n", ArtifactError, "bad side-file name"),
    ("generation_config.json", json.dumps({"auto_map": AUTO_MAP}).encode(), UnsafeFormatError,
     "auto_map"),
], ids=["python_file", "auto_map"])
def test_decompress_never_restores_code(tmp_path, artifact, name, data, error_type, reason):
    from engine.compress import decompress

    art = tmp_path / "art"
    shutil.copytree(artifact["art"], art)
    _smuggle(art, name, data)
    refused(tmp_path, lambda: decompress(art, artifact["base"], tmp_path / "out", device="cpu"),
            error_type, name, reason)


# ---------------------------------------------------------------- found beside the list
@pytest.mark.parametrize("payload,reason", [(b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
                                            (b'{"models": [], "models": []}', "duplicate key")],
                         ids=["deep", "duplicate"])
def test_hostile_zoo_manifest_is_a_named_error(tmp_path, payload, reason):
    """Calibration looks for a zoo.json above every model folder: a deeply nested one was a
    RecursionError traceback (merge) or crashed the compress calibration lookup."""
    from engine.merge.calibration import zoo_task_of
    from engine.zoo import load_manifest

    folder = write_model(tmp_path / "zoo" / "m", tiny_tensors(), config=dict(TINY_CONFIG))
    (tmp_path / "zoo" / "zoo.json").write_bytes(payload)
    refused(tmp_path, lambda: load_manifest(tmp_path / "zoo"), ConfigError, "zoo.json", reason)
    assert zoo_task_of(folder) is None  # not a zoo this engine can read: no task, no crash
