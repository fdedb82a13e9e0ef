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

Direct I/O. While tensors arrive in file order (a merge's do), their bytes bypass the page
cache: they are copied into an aligned ``BOUNCE`` buffer behind the header and written in whole
``ALIGN``-byte blocks through a second descriptor opened with ``O_DIRECT``; once the file's last
bytes have come, the partial last block is padded, written and the file cut to its size. A
buffered write makes the kernel
find and fill a page-cache page per 4 KiB and the final fsync then writes them all out:
measured on a 2-core VM's ext4, a new file's 576 MiB took 1.0-1.45 s of CPU to write (0.12 s
only right after another file's pages had been freed; overwriting cached pages 0.07 s) plus
0.16-0.23 s of fsync; written directly, 0.20 s of which 0.05 s CPU (the copies), and the fsync
has nothing left to write. A tensor's check then waits until its bytes are on disk (its blocks
written), and reads them back from the disk itself (``O_DIRECT`` reads, aligned), not from a
cache: ~0.2 s for 576 MiB, little CPU. Both paths compare with one ``memcmp``. The first
tensor written out of file order, a filesystem that refuses ``O_DIRECT`` (``open`` or a write
failing with EINVAL) or ``DIRECT_IO = False`` turn the file's remaining writes into ordinary
buffered ``pwrite``s (bytes still in the bounce buffer are written that way first); reads of
what was written directly stay direct (the kernel writes dirty cached pages of a range out
before it reads the range directly, so the two paths see the same bytes).

Two orders of the tensors in the file: ``"plan"`` keeps the caller's order within each element
size (larger elements first, so every tensor's data stays aligned: a merge writes in its
layout's order, which is then the file's order); ``"safetensors"`` is the order
``safetensors.torch.save_file`` uses (dtype rank, then name), so a buffered shard is
byte-for-byte the file safetensors itself would write.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import math
import mmap
import os
import struct
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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
MAX_CHECKS_PENDING = 4  # tensors written but not yet checked, with a checker thread ...
MAX_CHECK_BYTES = 64 << 20  # ... or more of them while they hold no more than this
ALIGN = 4096  # direct I/O's unit: offsets, lengths and memory in whole blocks (devices use 512 or 4096)
BOUNCE = 16 << 20  # direct writes go out in pieces of this size (a multiple of ALIGN)
DIRECT_PIECE = 8 << 20  # direct read-back piece (a multiple of ALIGN)
DIRECT_IO = True  # False: every write buffered (the tests run both paths)
_O_DIRECT = getattr(os, "O_DIRECT", 0)  # Linux; elsewhere buffered


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _pwrite_all(fd: int, data, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def direct_io_works(folder: Path) -> bool:
    """Whether a file under ``folder`` can be opened with ``O_DIRECT`` (so a shard written there
    goes to the disk directly while ``DIRECT_IO`` is on); tmpfs and others may refuse it."""
    if not _O_DIRECT:
        return False
    probe = Path(folder) / f".direct-io-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_EXCL | _O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    probe.unlink()
    return True


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def _aligned(nbytes: int) -> memoryview:
    """Writable, page-aligned (so ``ALIGN``-aligned) memory of ``nbytes`` bytes."""
    return memoryview(mmap.mmap(-1, nbytes))


def _libc_memcmp():
    try:
        memcmp = ctypes.CDLL(None).memcmp
    except (OSError, AttributeError):
        return None
    memcmp.restype = ctypes.c_int
    memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return memcmp


_MEMCMP = _libc_memcmp()


def _same_bytes(a: memoryview, b: memoryview) -> bool:
    """Whether two equally long byte views hold the same bytes: one ``memcmp`` (~0.25 ms per
    8 MiB, without the GIL; ``torch.equal`` of uint8 takes ~3 ms, a memoryview comparison goes
    item by item)."""
    x, y = np.frombuffer(a, dtype=np.uint8), np.frombuffer(b, dtype=np.uint8)
    if len(x) != len(y):
        return False
    if _MEMCMP is None:
        return bool(np.array_equal(x, y))
    return len(x) == 0 or _MEMCMP(x.ctypes.data, y.ctypes.data, len(x)) == 0


def _free(view: memoryview | None) -> None:
    """Unmap memory from ``_aligned`` now (a writer keeps its finished shards: their buffers
    must not stay resident); if a slice of it is still alive somewhere, the GC unmaps it."""
    if view is None:
        return
    backing = view.obj
    view.release()
    try:
        backing.close()
    except BufferError:
        pass


def _close_quietly(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def _pread_direct(fd: int, buf: memoryview, offset: int) -> int:
    """Fill the aligned ``buf`` from the aligned ``offset`` through an ``O_DIRECT`` descriptor;
    the bytes read, fewer where the file ends first (a read ending inside a block is the last)."""
    done = 0
    while done < len(buf):
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got <= 0:
            break
        done += got
        if done % ALIGN:
            break
    return done


def _pread_exact(fd: int, buf: memoryview, offset: int) -> bool:
    """Fill ``buf`` from ``offset``; False when the file ends first."""
    done = 0
    while done < len(buf):
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got <= 0:
            return False
        done += got
    return True


class _DiskStream:
    """A file's bytes read back from the disk in file order through an ``O_DIRECT`` descriptor,
    in aligned pieces of ``DIRECT_PIECE`` bytes: while one piece is compared and hashed, a
    helper thread reads the next (no further than ``limit()``, the end of what is on disk), so
    the disk's latency overlaps the CPU's work. One consumer thread at a time."""

    def __init__(self, fd: int, limit):
        self.fd = fd
        self._limit = limit
        self._buffers = [_aligned(DIRECT_PIECE), _aligned(DIRECT_PIECE)]
        self._current = (0, self._buffers[0][:0], 0)  # (file offset, bytes read, buffer index)
        self._pending = None  # (file offset, future of the bytes read, buffer index)
        self._helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="write-readback")

    def _read(self, position: int, index: int) -> memoryview:
        end = min(position + DIRECT_PIECE, _round_up(self._limit(), ALIGN))
        view = self._buffers[index][:max(0, end - position)]
        return view[:_pread_direct(self.fd, view, position)] if len(view) else view

    def _piece_at(self, at: int) -> tuple[int, memoryview]:
        """The piece holding file offset ``at`` (read now, or taken from the read ahead); the
        read of the one after it is started."""
        position, view, index = self._current
        if position <= at < position + len(view):
            return position, view
        if self._pending is not None:
            position, future, index = self._pending
            self._pending = None
            view = future.result()
            if not position <= at < position + len(view):  # not the one wanted: read it here
                position = at - at % ALIGN
                view = self._read(position, index)
        else:
            position, index = at - at % ALIGN, 1 - index
            view = self._read(position, index)
        self._current = (position, view, index)
        following = position + len(view)
        if len(view) == DIRECT_PIECE and following < self._limit():
            self._pending = (following, self._helper.submit(self._read, following, 1 - index),
                             1 - index)
        return position, view

    def pieces(self, lo: int, hi: int):
        """Yield memoryviews of the file's bytes [lo, hi) in order; a shorter total means the
        file ends first."""
        while lo < hi:
            position, view = self._piece_at(lo)
            if not position <= lo < position + len(view):
                return  # the file ends before lo
            b = min(hi, position + len(view))
            yield view[lo - position:b - position]
            lo = b

    def close(self) -> None:
        self._helper.shutdown(wait=True, cancel_futures=True)
        self._current = self._pending = None
        for view in self._buffers:
            _free(view)
        self._buffers = []


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
        self._jobs: deque = deque()  # (future of a check, its span's bytes)
        self._queued = 0  # bytes of the spans whose checks are in _jobs
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
        # direct I/O (module docstring): a second descriptor; bytes [_flushed, _filled) of the
        # file wait in the bounce buffer, the spans in _held wait for them to reach the disk
        self._direct: int | None = None  # the O_DIRECT descriptor, open until the last check
        self._writing_direct = False  # False once the file's writes turned buffered
        self._on_disk = [False] * len(spans)  # span i written directly: read it back directly
        self._held: deque = deque()  # (i, raw) of spans written into the bounce buffer
        self._flushed = self._filled = 0
        self._stream: _DiskStream | None = None
        self._bounce: memoryview | None = None
        self._prefix: bytes | None = prefix  # written with the first tensor (``_start``)
        with self.times.stage("write"):
            os.ftruncate(self.fd, self.size)

    def _start(self, in_order: bool) -> None:
        """The file's first bytes, the header: into the bounce buffer when the first tensor
        comes in file order and the filesystem takes ``O_DIRECT``, else written buffered. The
        direct descriptor and buffers exist from here until the file's last bytes are written
        (the bounce buffer) and checked (the read-back stream and the descriptor): a writer
        lays out all its shards up front and finishes them at its end, so only the shards being
        written hold them."""
        prefix, self._prefix = self._prefix, None
        if in_order and DIRECT_IO and _O_DIRECT:
            try:
                self._direct = os.open(self.path, os.O_RDWR | _O_DIRECT)
            except OSError:  # a filesystem without direct I/O: buffered
                pass
        if self._direct is not None:
            self._writing_direct = True
            self._bounce = _aligned(BOUNCE)
            self._stream = _DiskStream(self._direct, lambda: self._flushed)
            self._append(memoryview(prefix))
        else:
            _pwrite_all(self.fd, memoryview(prefix), 0)

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
                if self._prefix is not None:
                    self._start(in_order=begin == 0)
                if self._writing_direct and self.data_start + begin == self._filled:
                    self._append(raw)
                    if self._writing_direct:  # its check waits until its bytes are on disk
                        self._held.append((i, raw))
                        self._release()
                        if self._filled == self.size:  # the file's last bytes: out now (a
                            self._write_last_block()  # writer finishes its shards at the end)
                        return
                else:
                    self._buffered()  # out of file order (or buffered already): in place
                    _pwrite_all(self.fd, raw, self.data_start + begin)
        self._submit(i, raw)

    def _submit(self, i: int, raw) -> None:
        """Check span i here or on the checker thread (its bytes are in the file now)."""
        if self._checker is None:
            self._check(i, raw)
            return
        # bounded: the tensors waiting are held in memory (a few, or any number of small ones:
        # a direct write releases every span its block completes at once)
        while self._jobs and (self._jobs[0][0].done() or (
                len(self._jobs) >= MAX_CHECKS_PENDING and self._queued > MAX_CHECK_BYTES)):
            self._queued -= self._jobs[0][1]
            self._jobs.popleft()[0].result()
        nbytes = len(raw) if raw is not None else 0
        self._queued += nbytes
        self._jobs.append((self._checker.submit(self._check, i, raw), nbytes))

    # ------------------------------------------------------------ direct I/O
    def _append(self, raw) -> None:
        """Copy ``raw`` (the bytes at ``_filled``) into the bounce buffer; write it out directly
        each time it is full."""
        done = 0
        while done < len(raw):
            at = self._filled - self._flushed
            n = min(BOUNCE - at, len(raw) - done)
            self._bounce[at:at + n] = raw[done:done + n]
            self._filled += n
            done += n
            if self._filled - self._flushed == BOUNCE:
                if not self._write_bounce(BOUNCE):
                    _pwrite_all(self.fd, raw[done:], self._filled)  # the rest, buffered
                    self._filled += len(raw) - done
                    return

    def _write_bounce(self, nbytes: int) -> bool:
        """Write the bounce buffer's first ``nbytes`` (whole blocks) at ``_flushed`` through the
        direct descriptor; submit the checks of the spans now entirely on disk. False: direct
        I/O was refused (EINVAL) and the file's writes are buffered from here on."""
        try:
            _pwrite_all(self._direct, self._bounce[:nbytes], self._flushed)
        except OSError as err:
            if err.errno != errno.EINVAL:
                raise
            self._buffered()
            return False
        self._flushed = min(self._flushed + nbytes, self._filled)  # (the padded block: its end)
        self._release()
        return True

    def _release(self) -> None:
        """Submit the checks of the held spans whose bytes are all on disk now."""
        while self._held and self.data_start + self._spans[self._held[0][0]][1] <= self._flushed:
            i, raw = self._held.popleft()
            self._on_disk[i] = True
            self._submit(i, raw)

    def _buffered(self) -> None:
        """From here on, write buffered: the bytes still in the bounce buffer first (the spans
        waiting for them are then checked through the page cache)."""
        if not self._writing_direct:
            return
        self._writing_direct = False
        pending = self._filled - self._flushed
        if pending:
            _pwrite_all(self.fd, self._bounce[:pending], self._flushed)
        self._flushed = self._filled
        held, self._held = self._held, deque()
        for i, raw in held:
            self._submit(i, raw)

    def _write_last_block(self) -> None:
        """The direct path's end: the partial last block padded with zeros and written, the file
        cut back to its size."""
        pending = self._filled - self._flushed
        if pending:
            whole = _round_up(pending, ALIGN)
            self._bounce[pending:whole] = bytes(whole - pending)
            if self._write_bounce(whole):
                os.ftruncate(self.fd, self.size)
        self._writing_direct = False
        _free(self._bounce)  # the checks read the disk, not this
        self._bounce = None

    def _raise_failed(self) -> None:
        while self._jobs and self._jobs[0][0].done():
            self._queued -= self._jobs[0][1]
            self._jobs.popleft()[0].result()

    def _check(self, i: int, raw) -> None:
        """Read span i back, compare, hash what the hash has reached.
        Runs on one thread at a time, in the order the tensors were written."""
        begin, end, name = self._spans[i]
        if raw is not None:
            if self.verify:
                self._read_back(i, raw, hash_too=(i == self._next))
            elif i == self._next:
                with self.times.stage("hash"):
                    self._sha.update(raw)
        self._done[i] = True
        if i == self._next:
            self._next += 1
        self._advance()
        if self._next == len(self._spans):  # every byte checked: no more reads of the file
            self._close_direct()

    def _close_direct(self) -> None:
        """Stop the read-back stream and close the direct descriptor (a writer keeps its
        shards until it is done: a checked one holds no buffer, thread or extra descriptor)."""
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()
        fd, self._direct = self._direct, None
        _close_quietly(fd)

    def _read_back(self, i: int, given, *, hash_too: bool) -> None:
        """Read span i back piece by piece; compare with ``given`` (None: only hash)."""
        begin, end, name = self._spans[i]
        if self._on_disk[i]:
            self._read_back_direct(name, begin, end, given, hash_too=hash_too)
            return
        position = begin
        while position < end:
            n = min(PIECE, end - position)
            piece = self._scratch[:n]
            with self.times.stage("verify" if given is not None else "hash"):
                if not _pread_exact(self.fd, piece, self.data_start + position):
                    raise ExportError("verification failed: file shorter than its header says",
                                      path=self._dest, tensor=name)
                if given is not None and not _same_bytes(piece, given[position - begin:position - begin + n]):
                    raise ExportError("verification failed: bytes differ", path=self._dest,
                                      tensor=name)
            if hash_too:
                with self.times.stage("hash"):
                    self._sha.update(piece)
            position += n

    def _read_back_direct(self, name: str, begin: int, end: int, given, *, hash_too: bool) -> None:
        """``_read_back`` of a span written directly: its bytes come from the disk (the stream
        of read-back pieces; the span's part of each piece is compared and hashed)."""
        lo, hi = self.data_start + begin, self.data_start + end
        covered = lo
        for piece in self._stream.pieces(lo, hi):
            with self.times.stage("verify" if given is not None else "hash"):
                if given is not None and not _same_bytes(piece, given[covered - lo:covered - lo + len(piece)]):
                    raise ExportError("verification failed: bytes differ", path=self._dest,
                                      tensor=name)
            if hash_too:
                with self.times.stage("hash"):
                    self._sha.update(piece)
            covered += len(piece)
        if covered < hi:
            raise ExportError("verification failed: file shorter than its header says",
                              path=self._dest, tensor=name)

    def _advance(self) -> None:
        """Hash spans written ahead of the hash's position once it reaches them."""
        while self._next < len(self._spans) and self._done[self._next]:
            self._read_back(self._next, None, hash_too=True)
            self._next += 1

    def missing(self) -> list[str]:
        return [name for name in self.names if self._index[name] not in self._written]

    def _wait_checks(self) -> None:
        while self._jobs:
            self._queued -= self._jobs[0][1]
            self._jobs.popleft()[0].result()

    def finish(self) -> ShardResult:
        """Wait for the checks, fsync and close; the sha256 of every byte, the size and mtime
        it has now."""
        if self._prefix is not None:  # no tensor with bytes was written: the header alone
            with self.times.stage("write"):
                self._start(in_order=False)
        if self._writing_direct:
            with self.times.stage("write"):
                self._write_last_block()
        self._buffered()  # (nothing is held after the last block: a no-op then)
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
        self._queued = 0
        for job, _ in jobs:
            if not job.cancel():
                job.exception()
        self._held.clear()
        self._writing_direct = False
        self._close_direct()  # no read of the file is running after this
        _free(self._bounce)
        self._bounce = None
        fd, self.fd = self.fd, None
        _close_quietly(fd)


__all__ = ["ALIGN", "BOUNCE", "DIRECT_IO", "PIECE", "SHARD_METADATA", "ShardFile", "ShardResult",
           "direct_io_works", "itemsize", "ordered"]
