"""One safetensors file, laid out up front and written tensor by tensor in place.

The header (every tensor's dtype, shape and byte range) is written when the file is created,
so each tensor's bytes go straight to their place (``pwrite``), in any order, and nothing is
buffered. Each tensor is checked and hashed while its bytes are still in memory:

- verify: its bytes are read back from the file (in pieces of ``PIECE`` bytes, through one
  reused buffer) and compared with the bytes given, so a short write, a wrong offset or a
  change made between the write and the read is caught, naming the tensor;
- hash: the sha256 of the whole file (the manifest's) is fed in file order from those same
  read-back pieces: the file's own bytes, not a copy. A tensor written ahead of the hash's
  position is read once more when the hash reaches it (rare: a merge writes in file order).

So the file is read back once, piece by piece, while it is written, never in a second pass
after the last tensor. Given a ``checker`` thread, the reading back, comparing and hashing run
there, in write order, while the caller writes the next tensor (each tensor is held until it
is checked; at most ``MAX_CHECKS_PENDING`` wait). ``finish`` fsyncs the file and returns its
sha256, size and mtime. (Starting the writeback of each checked tensor early with
``sync_file_range`` was measured: the final fsync then took 0.01 s instead of 0.24 s, but the
pwrites of the next tensors became 1.6 times slower, a net loss of about 0.45 s on a 270M
merge, so it is not done.)

Two orders of the tensors in the file: ``"plan"`` keeps the caller's order within each element
size (larger elements first, so every tensor's data stays aligned: a merge writes in its
layout's order, which is then the file's order); ``"safetensors"`` is the order
``safetensors.torch.save_file`` uses (dtype rank, then name), so a buffered shard is
byte-for-byte the file safetensors itself would write.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.errors import ExportError
from engine.io.header import TORCH_TO_SAFETENSORS
from engine.io.stages import StageTimes

SHARD_METADATA = {"format": "pt"}
PIECE = 2 << 20  # read-back piece: fits the CPU cache, so compare and hash read it there

# safetensors' Dtype enum order (its save_file sorts by it, largest first, then by name)
_SAFETENSORS_RANK = {name: rank for rank, name in enumerate(
    ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
     "C64", "F64", "I64", "U64"])}
MAX_CHECKS_PENDING = 4  # tensors written but not yet checked, with a checker thread


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _pwrite_all(fd: int, data, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def _pread_exact(fd: int, buf: memoryview, offset: int) -> bool:
    """Fill ``buf`` from ``offset``; False when the file ends first."""
    done = 0
    while done < len(buf):
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got <= 0:
            return False
        done += got
    return True


@dataclass(frozen=True)
class ShardResult:
    path: Path
    sha256: str
    size: int
    mtime_ns: int


def ordered(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], order: str):
    """``entries`` (name, dtype, shape) in file order; see the module docstring."""
    if order == "plan":
        return sorted(entries, key=lambda e: -itemsize(e[1]))  # stable: the caller's order
    if order == "safetensors":
        return sorted(entries, key=lambda e: (-_SAFETENSORS_RANK[TORCH_TO_SAFETENSORS[e[1]]], e[0]))
    raise ValueError(f"unknown shard order {order!r}")


class ShardFile:
    """A safetensors file being written; one thread at a time writes to it."""

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], *,
                 order: str = "plan", times: StageTimes | None = None, dest: Path | None = None,
                 verify: bool = True, checker: ThreadPoolExecutor | None = None):
        self.path = Path(path)
        self._checker = checker  # the thread that reads back, compares and hashes (None: here)
        self._jobs: deque = deque()
        self._written: set[int] = set()
        self.verify = verify  # False: no read-back; the sha256 is fed from the bytes given
        self._dest = dest if dest is not None else self.path  # named in errors
        self.times = times if times is not None else StageTimes()
        header: dict = {"__metadata__": SHARD_METADATA}
        spans = []  # (begin, end, name), file order, relative to the data start
        offset = 0
        for name, dtype, shape in ordered(entries, order):
            nbytes = math.prod(shape) * itemsize(dtype)
            header[name] = {"dtype": TORCH_TO_SAFETENSORS[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            spans.append((offset, offset + nbytes, name))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        raw += b" " * ((-len(raw)) % 8)  # data starts 8-byte aligned, as safetensors pads it
        prefix = struct.pack("<Q", len(raw)) + raw
        self.data_start = len(prefix)
        self.size = self.data_start + offset
        self.names = [name for name, _, _ in entries]
        self._spans = spans
        self._index = {name: i for i, (_, _, name) in enumerate(spans)}
        self._entries = {name: (dtype, tuple(shape)) for name, dtype, shape in entries}
        self._done = [False] * len(spans)
        self._next = 0  # first span not yet hashed
        self._scratch = memoryview(bytearray(PIECE))
        self._sha = hashlib.sha256(prefix)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        with self.times.stage("write"):
            _pwrite_all(self.fd, memoryview(prefix), 0)
            os.ftruncate(self.fd, self.size)

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def planned(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self._entries[name]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one planned tensor (its dtype and shape as planned); it is then read back,
        compared and hashed, here or, given a ``checker`` thread, there while the caller goes
        on (the tensor is held until then; an error is raised by a later call)."""
        i = self._index[name]
        if i in self._written:
            raise ExportError("tensor added twice", path=self._dest, tensor=name)
        self._raise_failed()
        self._written.add(i)
        begin, end, _ = self._spans[i]
        data = raw = None
        if end > begin:
            data = tensor.detach().to("cpu").contiguous()
            raw = memoryview(data.reshape(-1).view(torch.uint8).numpy())
            with self.times.stage("write"):
                _pwrite_all(self.fd, raw, self.data_start + begin)
        if self._checker is None:
            self._check(i, raw)
            return
        while len(self._jobs) >= MAX_CHECKS_PENDING or (self._jobs and self._jobs[0].done()):
            self._jobs.popleft().result()  # bounded: the tensors waiting are held in memory
        self._jobs.append(self._checker.submit(self._check, i, raw))

    def _raise_failed(self) -> None:
        while self._jobs and self._jobs[0].done():
            self._jobs.popleft().result()

    def _check(self, i: int, raw) -> None:
        """Read span i back, compare, hash what the hash has reached.
        Runs on one thread at a time, in the order the tensors were written."""
        begin, end, name = self._spans[i]
        if raw is not None:
            if self.verify:
                self._read_back(name, begin, end, raw, hash_too=(i == self._next))
            elif i == self._next:
                with self.times.stage("hash"):
                    self._sha.update(raw)
        self._done[i] = True
        if i == self._next:
            self._next += 1
        self._advance()

    def _read_back(self, name: str, begin: int, end: int, given, *, hash_too: bool) -> None:
        """Read [begin, end) back piece by piece; compare with ``given`` (None: only hash)."""
        position = begin
        while position < end:
            n = min(PIECE, end - position)
            piece = self._scratch if n == PIECE else memoryview(bytearray(n))
            with self.times.stage("verify" if given is not None else "hash"):
                if not _pread_exact(self.fd, piece, self.data_start + position):
                    raise ExportError("verification failed: file shorter than its header says",
                                      path=self._dest, tensor=name)
                # bytearray == buffer is one memcmp (a memoryview == memoryview is per item)
                if given is not None and piece.obj != given[position - begin:position - begin + n]:
                    raise ExportError("verification failed: bytes differ", path=self._dest,
                                      tensor=name)
            if hash_too:
                with self.times.stage("hash"):
                    self._sha.update(piece)
            position += n

    def _advance(self) -> None:
        """Hash spans written ahead of the hash's position once it reaches them."""
        while self._next < len(self._spans) and self._done[self._next]:
            begin, end, name = self._spans[self._next]
            self._read_back(name, begin, end, None, hash_too=True)
            self._next += 1

    def missing(self) -> list[str]:
        return [name for name in self.names if self._index[name] not in self._written]

    def _wait_checks(self) -> None:
        while self._jobs:
            self._jobs.popleft().result()

    def finish(self) -> ShardResult:
        """Wait for the checks, fsync and close; the sha256 of every byte, the size and mtime
        it has now."""
        self._wait_checks()
        if self.missing() or not all(self._done):  # the writer names them first; a safety net
            raise ExportError("shard finished with tensors missing", path=self._dest,
                              tensor=self.missing()[0])
        with self.times.stage("fsync"):
            os.fsync(self.fd)
        st = os.fstat(self.fd)
        self.close()
        if st.st_size != self.size:
            raise ExportError(f"verification failed: {self.path.name} is {st.st_size} bytes, "
                              f"its header says {self.size}", path=self._dest)
        return ShardResult(self.path, self._sha.hexdigest(), st.st_size, st.st_mtime_ns)

    def close(self) -> None:
        """Close the file once no check is running on it (pending ones are cancelled)."""
        jobs, self._jobs = self._jobs, deque()
        for job in jobs:
            if not job.cancel():
                job.exception()
        fd, self.fd = self.fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


__all__ = ["PIECE", "SHARD_METADATA", "ShardFile", "ShardResult", "itemsize", "ordered"]
