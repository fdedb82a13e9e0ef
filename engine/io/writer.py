"""Staged, sharded, verified, atomic writer of a Hugging Face style model folder.

Usage::

    with ModelWriter(dest, config=cfg, extra_files={"tokenizer.json": path},
                     max_shard_bytes=2**30, manifest_extra={"recipe": ...},
                     input_folders=[base, *finetunes]) as writer:
        for name, tensor in tensors:
            writer.add_tensor(name, tensor)

Tensors are copied (contiguous, on the CPU, own storage: tied or strided views are fine) into
a shard buffer that is flushed to ``safetensors`` once it would exceed ``max_shard_bytes``, so
memory stays at about one shard. On a clean exit the writer writes the index (sharded case),
config.json, extra files and a manifest with sha256 per file, fsyncs everything, verifies by
reopening every shard, and renames the staging folder to ``dest`` in one step. On any failure
(KeyboardInterrupt included) the staging folder is removed and ``dest`` never appears; errors
of the writer's own work become ExportError naming the destination.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import engine
from engine.errors import DeltaWorkbenchError, ExportError
from engine.io.header import TORCH_TO_SAFETENSORS, read_header
from engine.io.staging import LOCK_NAME, make_staging_dir, remove_tree

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
MANIFEST_NAME = "delta_workbench_manifest.json"
SHARD_METADATA = {"format": "pt"}
RESERVED_MANIFEST_KEYS = {"manifest_version", "engine_version", "created", "files",
                          "tensor_count", "total_size"}
_HASH_CHUNK = 1 << 20


def shard_name(index: int, count: int) -> str:
    """Hugging Face shard naming: model-00001-of-00003.safetensors (1-based)."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return  # platforms without directory handles
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _tensor_digest(tensor: torch.Tensor) -> str:
    """Hash of a contiguous CPU tensor's raw bytes (any dtype, bf16 included)."""
    raw = tensor.reshape(-1).view(torch.uint8).numpy()
    return hashlib.blake2b(raw.data, digest_size=16).hexdigest()


def _is_inside(child: Path, folder: Path) -> bool:
    return child == folder or folder in child.parents


class ModelWriter:
    """Write a model folder atomically; see the module docstring."""

    def __init__(
        self,
        dest: str | Path,
        *,
        config: dict | None = None,
        extra_files: dict[str, Path | bytes | dict | list] | None = None,
        max_shard_bytes: int = 2**30,
        manifest_extra: dict | None = None,
        input_folders: list[str | Path] | tuple = (),
        verify: bool = True,
    ):
        self.dest = Path(dest).absolute()
        self.config = config
        self.extra_files = dict(extra_files or {})
        self.max_shard_bytes = int(max_shard_bytes)
        self.manifest_extra = dict(manifest_extra or {})
        self.input_folders = [Path(p) for p in input_folders]
        self.verify = verify
        self.staging: Path | None = None
        self._created_parents: list[Path] = []
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []  # temporary shard path, tensor names
        self._tensors: dict[str, tuple[str, tuple[int, ...], int, str]] = {}  # dtype, shape, nbytes, digest
        self._state = "new"
        self._check_arguments()

    # ----------------------------------------------------------------- public API
    def __enter__(self) -> "ModelWriter":
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()
        return False

    def open(self) -> "ModelWriter":
        """Check the destination and create the staging folder beside it."""
        if self._state != "new":
            raise ExportError("writer already opened", path=self.dest)
        self._check_destination()
        self._guard("creating the staging folder", self._make_staging)
        self._state = "open"
        return self

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Copy one tensor into the current shard buffer, flushing the buffer when full."""
        if self._state == "new":
            self.open()
        if self._state != "open":
            raise ExportError(f"cannot add tensor {name!r}: writer is {self._state}", path=self.dest)
        if not isinstance(name, str) or not name or name == "__metadata__":
            self.abort()
            raise ExportError(f"invalid tensor name {name!r}", path=self.dest)
        if name in self._tensors or name in self._buffer:
            self.abort()
            raise ExportError("tensor added twice", path=self.dest, tensor=name)
        self._guard(f"adding tensor {name!r}", self._add, name, tensor)

    def finalize(self) -> Path:
        """Flush, write index/config/extras/manifest, verify, rename to dest. Returns dest."""
        if self._state == "new":
            self.open()
        if self._state != "open":
            raise ExportError(f"cannot finalize: writer is {self._state}", path=self.dest)
        self._guard("finalizing", self._finalize)
        self._state = "done"
        return self.dest

    def abort(self) -> None:
        """Remove the staging folder (and parents this writer created). Safe to call twice."""
        if self.staging is not None:
            remove_tree(self.staging)
            self.staging = None
        for parent in reversed(self._created_parents):
            try:
                parent.rmdir()  # only if still empty
            except OSError:
                break
        self._created_parents.clear()
        self._buffer.clear()
        if self._state != "done":
            self._state = "aborted"

    # ----------------------------------------------------------------- checks
    def _check_arguments(self) -> None:
        if self.max_shard_bytes <= 0:
            raise ExportError("max_shard_bytes must be positive", path=self.dest)
        try:
            json.dumps(self.config)
            json.dumps(self.manifest_extra)
        except (TypeError, ValueError) as err:
            raise ExportError(f"config/manifest_extra is not JSON-serialisable: {err}",
                              path=self.dest) from None
        if self.config is not None and not isinstance(self.config, dict):
            raise ExportError("config must be a dict", path=self.dest)
        clash = RESERVED_MANIFEST_KEYS & set(self.manifest_extra)
        if clash:
            raise ExportError(f"manifest_extra uses reserved keys {sorted(clash)}", path=self.dest)
        reserved = {CONFIG_NAME, INDEX_NAME, MANIFEST_NAME, SINGLE_NAME, LOCK_NAME}
        for name, source in self.extra_files.items():
            if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name
                    or "\\" in name or name in reserved or name.endswith(".safetensors")):
                raise ExportError(f"extra file name {name!r} is not a plain, free basename",
                                  path=self.dest)
            if isinstance(source, str):
                raise ExportError(f"extra file {name!r}: pass a Path to copy a file or bytes for "
                                  "content, not a str", path=self.dest)
            if not isinstance(source, (Path, bytes, bytearray, dict, list)):
                raise ExportError(f"extra file {name!r}: unsupported source "
                                  f"{type(source).__name__}", path=self.dest)

    def _check_destination(self) -> None:
        dest = self.dest
        if dest.is_symlink():
            raise ExportError("destination is a symlink; refused", path=dest)
        if dest.exists():
            if not dest.is_dir():
                raise ExportError("destination exists and is not a folder", path=dest)
            if any(dest.iterdir()):
                raise ExportError("destination exists and is not empty; refused", path=dest)
        real_dest = dest.resolve()
        for folder in self.input_folders:
            real_input = folder.resolve()
            if _is_inside(real_dest, real_input):
                raise ExportError(f"destination lies inside input model folder {folder}; "
                                  "never writing into an input", path=dest)
            if _is_inside(real_input, real_dest):
                raise ExportError(f"input model folder {folder} lies inside the destination",
                                  path=dest)

    def _make_staging(self) -> None:
        missing = []
        parent = self.dest.parent
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        for folder in reversed(missing):
            folder.mkdir()
            self._created_parents.append(folder)
        self.staging = make_staging_dir(self.dest)

    # ----------------------------------------------------------------- work
    def _guard(self, what: str, fn, *args) -> None:
        """Run fn; on any failure remove staging. Foreign errors become ExportError."""
        try:
            fn(*args)
        except BaseException as err:
            self.abort()
            if isinstance(err, (DeltaWorkbenchError, KeyboardInterrupt, SystemExit, GeneratorExit)):
                raise
            detail = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            raise ExportError(f"{what} failed: {type(err).__name__}: {detail}",
                              path=self.dest) from err

    def _add(self, name: str, tensor: torch.Tensor) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise ExportError(f"not a tensor but {type(tensor).__name__}", path=self.dest, tensor=name)
        if tensor.layout != torch.strided or tensor.is_meta or tensor.dtype not in TORCH_TO_SAFETENSORS:
            raise ExportError(f"cannot store a {tensor.layout} tensor of {tensor.dtype}",
                              path=self.dest, tensor=name)
        # A private contiguous CPU copy: tied weights, views and later in-place edits by the
        # caller cannot alias what is saved.
        owned = tensor.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        nbytes = owned.numel() * owned.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = owned
        self._buffer_bytes += nbytes
        digest = _tensor_digest(owned) if self.verify else ""
        self._tensors[name] = (TORCH_TO_SAFETENSORS[owned.dtype], tuple(owned.shape), nbytes, digest)

    def _flush(self) -> None:
        if not self._buffer:
            return
        path = self.staging / f"shard-{len(self._shards) + 1:05d}.tmp.safetensors"
        save_file(self._buffer, str(path), metadata=SHARD_METADATA)
        _fsync_file(path)
        self._shards.append((path, list(self._buffer)))
        self._buffer = {}
        self._buffer_bytes = 0

    def _finalize(self) -> None:
        self._flush()
        staging = self.staging
        if not self._shards:
            raise ExportError("no tensors were added", path=self.dest)
        count = len(self._shards)
        weight_map: dict[str, str] = {}
        final_names = []
        for i, (tmp_path, names) in enumerate(self._shards, start=1):
            final = SINGLE_NAME if count == 1 else shard_name(i, count)
            os.rename(tmp_path, staging / final)
            final_names.append(final)
            weight_map.update({n: final for n in names})
        if count > 1:
            total = sum(nbytes for _, _, nbytes, _ in self._tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            _write_bytes(staging / INDEX_NAME, json.dumps(index, indent=2).encode())
        if self.config is not None:
            _write_bytes(staging / CONFIG_NAME, json.dumps(self.config, indent=2, sort_keys=True).encode())
        for name, source in self.extra_files.items():
            _write_bytes(staging / name, self._extra_bytes(name, source))

        files = {}
        for path in sorted(staging.iterdir()):
            if path.name == LOCK_NAME:
                continue
            files[path.name] = {"sha256": sha256_file(path), "size": path.stat().st_size}
        manifest = {
            "manifest_version": 1,
            "engine_version": engine.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "tensor_count": len(self._tensors),
            "total_size": sum(nbytes for _, _, nbytes, _ in self._tensors.values()),
            "files": files,
            **self.manifest_extra,
        }
        _write_bytes(staging / MANIFEST_NAME, json.dumps(manifest, indent=2).encode())
        _fsync_dir(staging)

        if self.verify:
            self._verify(final_names, weight_map, files)
        (staging / LOCK_NAME).unlink()
        self._check_destination()  # someone may have filled dest meanwhile
        os.rename(staging, self.dest)
        self.staging = None
        _fsync_dir(self.dest.parent)
        self._created_parents.clear()

    def _extra_bytes(self, name: str, source) -> bytes:
        if isinstance(source, (bytes, bytearray)):
            return bytes(source)
        if isinstance(source, (dict, list)):
            return json.dumps(source, indent=2).encode()
        try:
            return Path(source).read_bytes()
        except OSError as err:
            raise ExportError(f"cannot read extra file {name!r} from {source}: {err.strerror}",
                              path=self.dest) from None

    def _verify(self, shard_names: list[str], weight_map: dict[str, str], files: dict) -> None:
        """Reopen every shard: our strict header check, safetensors, keys, bytes, sha256."""
        for shard in shard_names:
            path = self.staging / shard
            expected = sorted(n for n, s in weight_map.items() if s == shard)
            header = read_header(path)
            if sorted(header.entries) != expected or header.metadata != SHARD_METADATA:
                raise ExportError(f"verification failed: {shard} keys or metadata differ", path=self.dest)
            with safe_open(str(path), framework="pt") as handle:
                if sorted(handle.keys()) != expected:
                    raise ExportError(f"verification failed: {shard} keys differ", path=self.dest)
                for name in expected:
                    dtype_name, shape, _, digest = self._tensors[name]
                    entry = header.entries[name]
                    if entry.dtype_name != dtype_name or entry.shape != shape:
                        raise ExportError("verification failed: dtype/shape differ",
                                          path=self.dest, tensor=name)
                    if _tensor_digest(handle.get_tensor(name)) != digest:
                        raise ExportError("verification failed: bytes differ", path=self.dest, tensor=name)
            if sha256_file(path) != files[shard]["sha256"]:
                raise ExportError(f"verification failed: sha256 of {shard} changed", path=self.dest)
