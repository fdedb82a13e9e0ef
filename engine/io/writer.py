"""Staged, sharded, verified, atomic writer of a Hugging Face style model folder.

Usage::

    with ModelWriter(dest, config=cfg, extra_files={"tokenizer.json": path},
                     max_shard_bytes=2**30, manifest_extra={"recipe": ...},
                     input_folders=[base, *finetunes]) as writer:
        for name, tensor in tensors:
            writer.add_tensor(name, tensor)

One writing path: every shard is an ``engine.io.shard.ShardFile`` (header laid out first,
each tensor written in place, then read back, compared and hashed in file order on the
writer's checker thread while the next tensor is written). What differs is only when a
shard's layout is known:

- given ``plan=[(name, dtype, shape), ...]`` (every tensor, known up front, as a merge knows
  its output layout), every shard is laid out when the writer opens and each tensor goes
  straight to its place as it is added, in any order: memory stays at the tensors being added
  and checked. A tensor must match its planned dtype and shape, and is held, not copied,
  until the checker thread has read it back: the caller hands it over and must not change it
  in place afterwards (a merge writes each result once). A planned tensor never added is an
  error at finalize;
- without a plan, tensors are copied (contiguous, on the CPU, own storage: tied or strided
  views are fine, later edits by the caller do not leak in) into a buffer that becomes a
  shard once the next tensor would exceed ``max_shard_bytes``; such a shard holds its tensors
  in ``safetensors.torch.save_file``'s order, byte for byte the file it would write.

Shards are split by the same ``max_shard_bytes`` rule in both cases. On a clean exit the
writer fsyncs the shards, writes the index (sharded case), config.json, extra files and a
manifest with sha256 per file (the shards' from their write-time hashing, the others read
once), fsyncs everything, verifies (every shard's header re-read by our strict parser and
opened by safetensors: keys, dtypes, shapes, size; the file unchanged since it was hashed)
and renames the staging folder to ``dest`` in one step. On any failure (KeyboardInterrupt
included) the staging folder is removed and ``dest`` never appears; errors of the writer's
own work become ExportError naming the destination.

``times`` (an ``engine.io.stages.StageTimes``) collects seconds per stage (write, verify,
hash, fsync, finalize); when given, the manifest records them under ``timings``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

import engine
from engine.errors import DeltaWorkbenchError, ExportError
from engine.io.header import TORCH_TO_SAFETENSORS, read_header
from engine.io.names import CONFIG_NAME, INDEX_NAME, MANIFEST_NAME, SINGLE_NAME, shard_name
from engine.io.shard import SHARD_METADATA, ShardFile, ShardResult, itemsize
from engine.io.stages import StageTimes
from engine.io.staging import (LOCK_NAME, check_destination, discard_staging,
                                make_staging_with_parents, unregister_staging)

RESERVED_MANIFEST_KEYS = {"manifest_version", "engine_version", "created", "files",
                          "tensor_count", "total_size", "timings"}
_HASH_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


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


def _write_unsynced(path: Path, data: bytes) -> None:
    with open(path, "xb") as handle:
        handle.write(data)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _split(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], max_bytes: int) -> list[list]:
    """Consecutive groups of entries, a new group once the next would exceed ``max_bytes``."""
    groups: list[list] = [[]]
    size = 0
    for entry in entries:
        nbytes = math.prod(entry[2]) * itemsize(entry[1])
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += nbytes
    return groups


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
        times: StageTimes | None = None,
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
        self.times = times if times is not None else StageTimes()
        self._record_times = times is not None
        self.staging: Path | None = None
        self._created_parents: list[Path] = []
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[ShardFile] = []
        self._results: list[ShardResult] = []
        self._tensors: dict[str, tuple[str, tuple[int, ...], int]] = {}  # dtype name, shape, nbytes
        self._plan = [(n, d, tuple(int(x) for x in shape)) for n, d, shape in plan] if plan is not None else None
        self._where: dict[str, ShardFile] = {}  # planned tensor -> its shard
        self._checker: ThreadPoolExecutor | None = None  # reads back, compares, hashes
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
        check_destination(self.dest, self.input_folders)
        self._guard("creating the staging folder", self._make_staging)
        self._checker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="write-check")
        if self._plan is not None:
            self._guard("laying out the shards", self._layout_plan)
        self._state = "open"
        return self

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor in place (plan) or copy it into the shard buffer (no plan)."""
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
        with self.times.stage("finalize"):
            self._guard("finalizing", self._finalize)
        self._stop_checker()
        self._state = "done"
        return self.dest

    def _stop_checker(self) -> None:
        checker, self._checker = self._checker, None
        if checker is not None:
            checker.shutdown(wait=True, cancel_futures=True)

    def abort(self) -> None:
        """Remove the staging folder (and parents this writer created). Safe to call twice."""
        for shard in self._shards:
            shard.close()  # waits for a check still running on it
        self._stop_checker()
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

    def _new_shard(self, entries, order: str) -> ShardFile:
        path = self.staging / f"shard-{len(self._shards) + 1:05d}.tmp.safetensors"
        shard = ShardFile(path, entries, order=order, times=self.times, dest=self.dest,
                          verify=self.verify, checker=self._checker)
        self._shards.append(shard)
        return shard

    def _layout_plan(self) -> None:
        for group in _split(self._plan, self.max_shard_bytes):
            shard = self._new_shard(group, "plan")
            self._where.update({name: shard for name, _, _ in group})

    def _add(self, name: str, tensor: torch.Tensor) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise ExportError(f"not a tensor but {type(tensor).__name__}", path=self.dest, tensor=name)
        if tensor.layout != torch.strided or tensor.is_meta or tensor.dtype not in TORCH_TO_SAFETENSORS:
            raise ExportError(f"cannot store a {tensor.layout} tensor of {tensor.dtype}",
                              path=self.dest, tensor=name)
        shape = tuple(tensor.shape)
        nbytes = tensor.numel() * tensor.element_size()
        if self._plan is not None:
            shard = self._where.get(name)
            if shard is None:
                raise ExportError("tensor not in the writer's plan", path=self.dest, tensor=name)
            dtype, planned_shape = shard.planned(name)
            if tensor.dtype != dtype or shape != planned_shape:
                raise ExportError(f"planned as {dtype} {planned_shape}, given {tensor.dtype} {shape}",
                                  path=self.dest, tensor=name)
            shard.write(name, tensor)
        else:
            # A private contiguous CPU copy: tied weights, views and later in-place edits by
            # the caller cannot alias what is saved.
            owned = tensor.detach().to("cpu").clone(memory_format=torch.contiguous_format)
            if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
                self._flush()
            self._buffer[name] = owned
            self._buffer_bytes += nbytes
        self._tensors[name] = (TORCH_TO_SAFETENSORS[tensor.dtype], shape, nbytes)

    def _flush(self) -> None:
        """The buffered tensors become one shard, written, checked and fsynced now."""
        if not self._buffer:
            return
        buffered, self._buffer, self._buffer_bytes = self._buffer, {}, 0
        shard = self._new_shard([(n, t.dtype, tuple(t.shape)) for n, t in buffered.items()],
                                "safetensors")
        for name, tensor in buffered.items():
            shard.write(name, tensor)
        self._results.append(shard.finish())

    def _finish_shards(self) -> None:
        if self._plan is not None:
            missing = [n for n, _, _ in self._plan if n not in self._tensors]
            if missing:
                raise ExportError(f"{len(missing)} planned tensor(s) never added, first {missing[:3]}",
                                  path=self.dest, tensor=missing[0])
            self._results = [shard.finish() for shard in self._shards]
        else:
            self._flush()

    def _finalize(self) -> None:
        self._finish_shards()
        staging = self.staging
        if not self._shards:
            raise ExportError("no tensors were added", path=self.dest)
        count = len(self._shards)
        if count > 1 and self.weights_name != SINGLE_NAME:
            raise ExportError(f"{self.weights_name} must be one file; raise max_shard_bytes",
                              path=self.dest)
        weight_map: dict[str, str] = {}
        files: dict[str, dict] = {}
        finals: dict[str, tuple[ShardFile, ShardResult]] = {}
        for i, (shard, result) in enumerate(zip(self._shards, self._results), start=1):
            final = self.weights_name if count == 1 else shard_name(i, count)
            os.rename(shard.path, staging / final)
            finals[final] = (shard, result)
            files[final] = {"sha256": result.sha256, "size": result.size}
            weight_map.update({n: final for n in shard.names})
        # The small files are all written first, then fsynced: the first fsync commits the
        # journal for all of them, so the others find nothing left to do.
        small: dict[str, bytes] = {}
        if count > 1:
            total = sum(nbytes for _, _, nbytes in self._tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            small[INDEX_NAME] = json.dumps(index, indent=2).encode()
        if self.config is not None:
            small[self.config_name] = json.dumps(self.config, indent=2, sort_keys=True).encode()
        for name, source in self.extra_files.items():
            small[name] = self._extra_bytes(name, source)
        for name, data in small.items():
            _write_unsynced(staging / name, data)
        if self.late_files is not None:
            for name, data in self.late_files(staging).items():
                self._check_extra_name(name)
                if name in small or not isinstance(data, (bytes, bytearray)):
                    raise ExportError(f"late file {name!r} must be new and given as bytes",
                                      path=self.dest)
                small[name] = bytes(data)
                _write_unsynced(staging / name, small[name])
        with self.times.stage("fsync"):
            for name in small:
                _fsync_path(staging / name)
        with self.times.stage("hash"):
            for path in sorted(staging.iterdir()):  # the small files: read once for their sha256
                if path.name != LOCK_NAME and path.name not in files:
                    files[path.name] = {"sha256": sha256_file(path), "size": path.stat().st_size}
        manifest = {
            "manifest_version": 1,
            "engine_version": engine.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "tensor_count": len(self._tensors),
            "total_size": sum(nbytes for _, _, nbytes in self._tensors.values()),
            "files": dict(sorted(files.items())),
            **self.manifest_extra,
        }
        if self._record_times:
            manifest["timings"] = self.times.seconds()
        _write_bytes(staging / MANIFEST_NAME, json.dumps(manifest, indent=2).encode())
        _fsync_dir(staging)

        if self.verify:
            self._verify(finals, weight_map)
        (staging / LOCK_NAME).unlink()
        check_destination(self.dest, self.input_folders)  # someone may have filled dest meanwhile
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

    def _verify(self, finals: dict[str, tuple[ShardFile, ShardResult]], weight_map: dict[str, str]) -> None:
        """Every shard as a reader sees it: our strict header check, safetensors accepts it,
        keys, metadata, dtypes, shapes; its size and mtime those it had when its hash was done
        (every tensor's bytes were read back and compared as it was written)."""
        for final, (_, result) in finals.items():
            path = self.staging / final
            expected = sorted(n for n, s in weight_map.items() if s == final)
            header = read_header(path)
            if sorted(header.entries) != expected or header.metadata != SHARD_METADATA:
                raise ExportError(f"verification failed: {final} keys or metadata differ", path=self.dest)
            with safe_open(str(path), framework="pt") as handle:  # safetensors accepts it
                if sorted(handle.keys()) != expected:
                    raise ExportError(f"verification failed: {final} keys differ", path=self.dest)
            for name in expected:
                dtype_name, shape, _ = self._tensors[name]
                entry = header.entries[name]
                if entry.dtype_name != dtype_name or entry.shape != shape:
                    raise ExportError("verification failed: dtype/shape differ",
                                      path=self.dest, tensor=name)
            st = path.stat()
            if (st.st_size, st.st_mtime_ns) != (result.size, result.mtime_ns):
                raise ExportError(f"verification failed: {final} changed after it was hashed",
                                  path=self.dest)


__all__ = ["CONFIG_NAME", "INDEX_NAME", "MANIFEST_NAME", "ModelWriter", "SHARD_METADATA",
           "SINGLE_NAME", "sha256_file", "shard_name"]
