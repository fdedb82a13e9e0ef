"""Staged, sharded, verified, atomic writer of a Hugging Face style model folder.

Usage::

    with ModelWriter(dest, config=cfg, extra_files={"tokenizer.json": path},
                     max_shard_bytes=2**30, manifest_extra={"recipe": ...},
                     input_folders=[base, *finetunes]) as writer:
        for name, tensor in tensors:
            writer.add_tensor(name, tensor)

Tensors are copied (contiguous, on the CPU, own storage: tied or strided views are fine) into
a shard buffer that is flushed to ``safetensors`` once it would exceed ``max_shard_bytes``, so
memory stays at about one shard.

Streaming mode: given ``plan=[(name, dtype, shape), ...]`` (every tensor, known up front, as a
merge knows its output layout), the shard files and their headers are laid out when the writer
opens and each tensor's bytes are written straight to its place in its shard (``pwrite``) as
it is added, in any order: nothing is buffered, so memory stays at the tensor being added. A
tensor must match its planned dtype and shape; a planned tensor never added is an error at
finalize. Shards are split by the same ``max_shard_bytes`` rule, in plan order. On a clean exit the writer writes the index (sharded case),
config.json, extra files and a manifest with sha256 per file, fsyncs everything, verifies by
reopening every shard, and renames the staging folder to ``dest`` in one step. On any failure
(KeyboardInterrupt included) the staging folder is removed and ``dest`` never appears; errors
of the writer's own work become ExportError naming the destination.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import engine
from engine.errors import DeltaWorkbenchError, ExportError
from engine.io.header import TORCH_TO_SAFETENSORS, read_header
from engine.io.staging import (LOCK_NAME, check_destination, discard_staging,
                                make_staging_with_parents, unregister_staging)

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
    """Check value of a contiguous CPU tensor's raw bytes (any dtype, bf16 included), compared
    with the bytes read back from the written shard. CRC-32 (with the length): it catches
    accidental corruption, which is what the read-back guards against, at several GB/s."""
    raw = tensor.reshape(-1).view(torch.uint8).numpy()
    return f"{raw.nbytes}:{zlib.crc32(raw.data):08x}"


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def _read_back(path: Path, header) -> tuple[dict[str, str], str]:
    """(per-tensor digests as _tensor_digest computes them, sha256 of the file), in one
    sequential pass of bounded reads."""
    sha = hashlib.sha256()
    digests: dict[str, str] = {}
    spans = sorted((e.begin, e.end, e.name) for e in header.entries.values())
    # hashlib releases the GIL on large buffers: sha256 runs in a helper thread while this
    # thread computes the per-tensor digest of the same chunk
    hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
    pending = None
    with hasher, open(path, "rb", buffering=0) as handle:
        head = handle.read(header.data_start)
        sha.update(head)
        position = 0
        for begin, end, name in spans:
            if begin != position:  # the header check guarantees tiling; be safe anyway
                raise ExportError("verification failed: data offsets do not tile the file", path=path)
            crc = 0
            left = end - begin
            while left:
                chunk = handle.read(min(left, _HASH_CHUNK * 16))
                if not chunk:
                    raise ExportError("verification failed: file shorter than its header says",
                                      path=path, tensor=name)
                if pending is not None:
                    pending.result()
                pending = hasher.submit(sha.update, chunk)
                crc = zlib.crc32(chunk, crc)
                left -= len(chunk)
            digests[name] = f"{end - begin}:{crc:08x}"
            position = end
        if pending is not None:
            pending.result()
        sha.update(handle.read())
    return digests, sha.hexdigest()


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
        plan: list[tuple[str, torch.dtype, tuple[int, ...]]] | None = None,
        weights_name: str = SINGLE_NAME,
        config_name: str = CONFIG_NAME,
        late_files: Callable[[Path], dict[str, bytes]] | None = None,
    ):
        self.dest = Path(dest).absolute()
        # A PEFT adapter is one adapter_model.safetensors beside adapter_config.json.
        self.weights_name, self.config_name = weights_name, config_name
        self.config = config
        self.extra_files = dict(extra_files or {})
        # Files made from the written folder itself (a model card with the output's evaluation):
        # called with the staging folder once weights, config and extra files are in it, before
        # anything is hashed, so they are part of the one atomic write and of the manifest.
        self.late_files = late_files
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
        self._plan = [(n, d, tuple(int(x) for x in shape)) for n, d, shape in plan] if plan is not None else None
        self._slots: dict[str, tuple[int, int, int, torch.dtype, tuple[int, ...]]] = {}  # fd, offset, nbytes, dtype, shape
        self._fds: list[int] = []
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
        if self._plan is not None:
            self._guard("laying out the shards", self._layout_plan)
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
        self._close_fds()
        discard_staging(self.staging, self._created_parents)
        self.staging = None
        self._buffer.clear()
        if self._state != "done":
            self._state = "aborted"

    # ----------------------------------------------------------------- checks
    def _check_arguments(self) -> None:
        if self.max_shard_bytes <= 0:
            raise ExportError("max_shard_bytes must be positive", path=self.dest)
        if self._plan is not None:
            names = [n for n, _, _ in self._plan]
            if not names:
                raise ExportError("an empty plan: no tensors to write", path=self.dest)
            if len(set(names)) != len(names):
                raise ExportError("a tensor is planned twice", path=self.dest)
            for name, dtype, shape in self._plan:
                if not isinstance(name, str) or not name or name == "__metadata__":
                    raise ExportError(f"invalid tensor name {name!r}", path=self.dest)
                if dtype not in TORCH_TO_SAFETENSORS or any(x < 0 for x in shape):
                    raise ExportError(f"cannot plan a tensor of {dtype} shaped {shape}", path=self.dest,
                                      tensor=name)
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
        for name, source in self.extra_files.items():
            self._check_extra_name(name)
            if isinstance(source, str):
                raise ExportError(f"extra file {name!r}: pass a Path to copy a file or bytes for "
                                  "content, not a str", path=self.dest)
            if not isinstance(source, (Path, bytes, bytearray, dict, list)):
                raise ExportError(f"extra file {name!r}: unsupported source "
                                  f"{type(source).__name__}", path=self.dest)

    def _check_extra_name(self, name) -> None:
        reserved = {self.config_name, INDEX_NAME, MANIFEST_NAME, self.weights_name, LOCK_NAME}
        if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name
                or "\\" in name or name in reserved or name.endswith(".safetensors")):
            raise ExportError(f"extra file name {name!r} is not a plain, free basename",
                              path=self.dest)

    def _check_destination(self) -> None:
        check_destination(self.dest, self.input_folders)

    def _make_staging(self) -> None:
        self.staging, self._created_parents = make_staging_with_parents(self.dest)

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
        if self._plan is not None:
            self._write_planned(name, tensor)
            return
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

    # ----------------------------------------------------------------- streaming mode
    def _layout_plan(self) -> None:
        groups: list[list[tuple[str, torch.dtype, tuple[int, ...], int]]] = [[]]
        size = 0
        for name, dtype, shape in self._plan:
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if groups[-1] and size + nbytes > self.max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append((name, dtype, shape, nbytes))
            size += nbytes
        for index, group in enumerate(groups, start=1):
            # larger elements first, as safetensors does, so every tensor's data stays aligned
            ordered = sorted(group, key=lambda t: -torch.empty((), dtype=t[1]).element_size())
            header: dict = {"__metadata__": SHARD_METADATA}
            offset = 0
            for name, dtype, shape, nbytes in ordered:
                header[name] = {"dtype": TORCH_TO_SAFETENSORS[dtype], "shape": list(shape),
                                "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * ((-len(raw)) % 8)
            path = self.staging / f"shard-{index:05d}.tmp.safetensors"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            self._fds.append(fd)
            prefix = struct.pack("<Q", len(raw)) + raw
            _pwrite_all(fd, memoryview(prefix), 0)
            os.ftruncate(fd, len(prefix) + offset)
            data_start = len(prefix)
            for name, dtype, shape, nbytes in ordered:
                begin = header[name]["data_offsets"][0]
                self._slots[name] = (fd, data_start + begin, nbytes, dtype, shape)
            self._shards.append((path, [name for name, _, _, _ in group]))

    def _write_planned(self, name: str, tensor: torch.Tensor) -> None:
        slot = self._slots.get(name)
        if slot is None:
            raise ExportError("tensor not in the writer's plan", path=self.dest, tensor=name)
        fd, offset, nbytes, dtype, shape = slot
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ExportError(f"planned as {dtype} {shape}, given {tensor.dtype} {tuple(tensor.shape)}",
                              path=self.dest, tensor=name)
        data = tensor.detach().to("cpu").contiguous()
        digest = _tensor_digest(data) if self.verify else ""
        if nbytes:
            _pwrite_all(fd, memoryview(data.reshape(-1).view(torch.uint8).numpy()), offset)
        self._tensors[name] = (TORCH_TO_SAFETENSORS[dtype], shape, nbytes, digest)

    def _finish_planned(self) -> None:
        missing = [n for n, _, _ in self._plan if n not in self._tensors]
        if missing:
            raise ExportError(f"{len(missing)} planned tensor(s) never added, first {missing[:3]}",
                              path=self.dest, tensor=missing[0])
        for fd in self._fds:
            os.fsync(fd)
        self._close_fds()

    def _close_fds(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def _flush(self) -> None:
        if self._plan is not None:
            return
        if not self._buffer:
            return
        path = self.staging / f"shard-{len(self._shards) + 1:05d}.tmp.safetensors"
        save_file(self._buffer, str(path), metadata=SHARD_METADATA)
        _fsync_file(path)
        self._shards.append((path, list(self._buffer)))
        self._buffer = {}
        self._buffer_bytes = 0

    def _finalize(self) -> None:
        if self._plan is not None:
            self._finish_planned()
        self._flush()
        staging = self.staging
        if not self._shards:
            raise ExportError("no tensors were added", path=self.dest)
        count = len(self._shards)
        if count > 1 and self.weights_name != SINGLE_NAME:
            raise ExportError(f"{self.weights_name} must be one file; raise max_shard_bytes",
                              path=self.dest)
        weight_map: dict[str, str] = {}
        final_names = []
        for i, (tmp_path, names) in enumerate(self._shards, start=1):
            final = self.weights_name if count == 1 else shard_name(i, count)
            os.rename(tmp_path, staging / final)
            final_names.append(final)
            weight_map.update({n: final for n in names})
        if count > 1:
            total = sum(nbytes for _, _, nbytes, _ in self._tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            _write_bytes(staging / INDEX_NAME, json.dumps(index, indent=2).encode())
        if self.config is not None:
            _write_bytes(staging / self.config_name, json.dumps(self.config, indent=2, sort_keys=True).encode())
        for name, source in self.extra_files.items():
            _write_bytes(staging / name, self._extra_bytes(name, source))
        if self.late_files is not None:
            for name, data in self.late_files(staging).items():
                self._check_extra_name(name)
                if name in self.extra_files or not isinstance(data, (bytes, bytearray)):
                    raise ExportError(f"late file {name!r} must be new and given as bytes",
                                      path=self.dest)
                _write_bytes(staging / name, bytes(data))

        files = {}
        read_back: dict[str, tuple] = {}
        for path in sorted(staging.iterdir()):
            if path.name == LOCK_NAME:
                continue
            if self.verify and path.name in final_names:
                # one sequential read gives both the manifest's sha256 and the bytes check
                header = read_header(path)
                digests, sha = _read_back(path, header)
                st = path.stat()
                read_back[path.name] = (header, digests, st.st_size, st.st_mtime_ns)
                files[path.name] = {"sha256": sha, "size": st.st_size}
            else:
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
            self._verify(final_names, weight_map, read_back)
        (staging / LOCK_NAME).unlink()
        self._check_destination()  # someone may have filled dest meanwhile
        os.rename(staging, self.dest)
        self.staging = None
        unregister_staging(staging)
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

    def _verify(self, shard_names: list[str], weight_map: dict[str, str], read_back: dict) -> None:
        """Every shard read back: our strict header check, safetensors accepts it, keys, dtypes,
        shapes, and every tensor's bytes equal to what was given (digests from the one read
        that also gave the manifest's sha256; the file unchanged since)."""
        for shard in shard_names:
            path = self.staging / shard
            expected = sorted(n for n, s in weight_map.items() if s == shard)
            header, digests, size, mtime_ns = read_back[shard]
            if sorted(header.entries) != expected or header.metadata != SHARD_METADATA:
                raise ExportError(f"verification failed: {shard} keys or metadata differ", path=self.dest)
            with safe_open(str(path), framework="pt") as handle:  # safetensors accepts it
                if sorted(handle.keys()) != expected:
                    raise ExportError(f"verification failed: {shard} keys differ", path=self.dest)
            for name in expected:
                dtype_name, shape, _, digest = self._tensors[name]
                entry = header.entries[name]
                if entry.dtype_name != dtype_name or entry.shape != shape:
                    raise ExportError("verification failed: dtype/shape differ",
                                      path=self.dest, tensor=name)
                if digests[name] != digest:
                    raise ExportError("verification failed: bytes differ", path=self.dest, tensor=name)
            st = path.stat()
            if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
                raise ExportError(f"verification failed: {shard} changed after it was hashed", path=self.dest)
