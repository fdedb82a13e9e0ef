"""Exact bit packing and a small binary section format for compressed tensors.

Everything here is lossless and byte-exact; the tests round-trip every function.

- ``pack_bits`` / ``unpack_bits``: bool arrays, 8 a byte, first entry in the high bit
  (``numpy.packbits`` order).
- ``pack_uint`` / ``unpack_uint``: unsigned codes of a fixed width ``b`` (1..32 bits), written
  as one continuous big-endian bit stream (no per-byte padding between codes).
- ``rice_encode`` / ``rice_decode``: sorted distinct indices as Golomb-Rice coded gaps, split
  into two streams (unary quotients, fixed-width remainders) so both directions vectorise.
- ``SectionWriter`` / ``SectionReader``: a tensor's compressed bytes (small integers, fp16
  arrays, bit fields); the reader bounds-checks every read so a corrupt section is an error,
  never a wrong tensor or a crash.
"""

from __future__ import annotations

import math

import numpy as np

from engine.errors import ArtifactError


# ---------------------------------------------------------------- bit fields
def pack_bits(mask) -> bytes:
    """A bool array (any shape, flattened in C order) as bytes, ceil(n / 8) of them."""
    flat = np.asarray(mask, dtype=bool).reshape(-1)
    return np.packbits(flat).tobytes()


def unpack_bits(data: bytes | memoryview | np.ndarray, count: int) -> np.ndarray:
    """Inverse of ``pack_bits``: the first ``count`` bits as a bool array."""
    raw = np.frombuffer(bytes(data), dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    if raw.size * 8 < count:
        raise ArtifactError(f"bit field holds {raw.size * 8} bits, {count} needed")
    return np.unpackbits(raw, count=count).astype(bool)


def packed_uint_bytes(count: int, width: int) -> int:
    return (count * width + 7) // 8


_CHUNK = 1 << 18  # codes per chunk: a multiple of 8, so chunks start on byte boundaries


def pack_uint(codes, width: int) -> bytes:
    """Unsigned integer codes (< 2**width) as a continuous bit stream, most significant bit first."""
    if not 1 <= width <= 32:
        raise ValueError(f"code width {width} outside 1..32")
    values = np.asarray(codes).reshape(-1).astype(np.uint64)
    if values.size and int(values.max()) >> width:
        raise ValueError(f"a code does not fit in {width} bits")
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
    parts = []
    for start in range(0, values.size, _CHUNK):
        chunk = values[start:start + _CHUNK]
        bits = ((chunk[:, None] >> shifts[None, :]) & np.uint64(1)).astype(bool)
        parts.append(np.packbits(bits.reshape(-1)).tobytes())
    return b"".join(parts)


def unpack_uint(data, count: int, width: int) -> np.ndarray:
    """Inverse of ``pack_uint``: ``count`` codes of ``width`` bits (int64 array)."""
    if not 1 <= width <= 32:
        raise ArtifactError(f"code width {width} outside 1..32")
    raw = np.frombuffer(bytes(data), dtype=np.uint8)
    if raw.size * 8 < count * width:
        raise ArtifactError(f"code stream holds {raw.size * 8} bits, {count * width} needed")
    weights = (np.int64(1) << np.arange(width - 1, -1, -1, dtype=np.int64))
    out = np.empty(count, dtype=np.int64)
    step = _CHUNK * width // 8  # bytes per chunk of codes
    for i, start in enumerate(range(0, count, _CHUNK)):
        n = min(_CHUNK, count - start)
        bits = np.unpackbits(raw[i * step:i * step + (n * width + 7) // 8], count=n * width)
        out[start:start + n] = bits.reshape(n, width).astype(np.int64) @ weights
    return out


# ---------------------------------------------------------------- Golomb-Rice coded indices
def _gaps(indices: np.ndarray) -> np.ndarray:
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size == 0:
        return idx
    gaps = np.diff(idx, prepend=-1) - 1
    if (gaps < 0).any():
        raise ValueError("indices must be sorted and distinct")
    return gaps


def rice_parameter(indices: np.ndarray) -> int:
    """The Rice parameter with the fewest bits for these gaps (searched around log2(mean))."""
    gaps = _gaps(indices)
    if gaps.size == 0:
        return 0
    guess = max(0, int(math.log2(max(1.0, float(gaps.mean()) * math.log(2)))))
    return min(range(max(0, guess - 2), min(30, guess + 3)), key=lambda r: rice_bits(gaps, r, True))


def rice_bits(indices_or_gaps: np.ndarray, r: int, are_gaps: bool = False) -> int:
    """Exact size in bits of the two Rice streams (unary quotients + r-bit remainders)."""
    gaps = indices_or_gaps if are_gaps else _gaps(indices_or_gaps)
    return int((gaps >> r).sum()) + gaps.size * (r + 1)


def rice_bytes(indices: np.ndarray, r: int) -> tuple[int, int]:
    """(bytes of the unary stream, bytes of the remainder stream)."""
    gaps = _gaps(indices)
    unary_bits = int((gaps >> r).sum()) + gaps.size
    return (unary_bits + 7) // 8, packed_uint_bytes(gaps.size, r) if r else 0


def rice_encode(indices: np.ndarray, r: int) -> tuple[bytes, bytes]:
    """Sorted distinct indices -> (unary stream, remainder stream)."""
    gaps = _gaps(indices)
    quotients = gaps >> r
    lengths = quotients + 1
    total = int(lengths.sum())
    bits = np.ones(total, dtype=bool)
    ends = np.cumsum(lengths) - 1  # each unary code ends with a 0
    bits[ends] = False
    unary = np.packbits(bits).tobytes()
    rem = pack_uint(gaps & ((1 << r) - 1), r) if r and gaps.size else b""
    return unary, rem


def rice_decode(unary, rem, count: int, r: int) -> np.ndarray:
    """Inverse of ``rice_encode``: ``count`` sorted indices (int64)."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    raw = np.frombuffer(bytes(unary), dtype=np.uint8)
    bits = np.unpackbits(raw).astype(bool)
    zeros = np.flatnonzero(~bits)
    if zeros.size < count:
        raise ArtifactError(f"index stream holds {zeros.size} codes, {count} expected")
    ends = zeros[:count]
    quotients = np.diff(ends, prepend=-1) - 1
    remainders = unpack_uint(rem, count, r) if r else np.zeros(count, dtype=np.int64)
    gaps = (quotients << r) | remainders
    return np.cumsum(gaps + 1) - 1


# ---------------------------------------------------------------- sections
class SectionWriter:
    """Accumulates one tensor's compressed bytes."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.size = 0

    def _put(self, raw: bytes) -> None:
        self._parts.append(raw)
        self.size += len(raw)

    def uint(self, value: int, nbytes: int) -> None:
        value = int(value)
        if value < 0 or value >> (8 * nbytes):
            raise ValueError(f"{value} does not fit in {nbytes} unsigned bytes")
        self._put(value.to_bytes(nbytes, "little"))

    def f16(self, values) -> None:
        arr = np.asarray(values, dtype=np.float32).reshape(-1)
        half = arr.astype(np.float16)
        if not np.isfinite(half[np.isfinite(arr)]).all():
            raise ValueError("a value overflows float16")
        self._put(half.astype("<f2").tobytes())

    def f32(self, values) -> None:
        self._put(np.asarray(values, dtype="<f4").reshape(-1).tobytes())

    def raw(self, data: bytes) -> None:
        self._put(bytes(data))

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


class SectionReader:
    """Reads a section written by ``SectionWriter``; every read is bounds-checked."""

    def __init__(self, data, what: str = "section"):
        self.data = memoryview(bytes(data))
        self.pos = 0
        self.what = what

    def _take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise ArtifactError(f"{self.what} is truncated or corrupt (needs {n} bytes at "
                                f"{self.pos}, has {len(self.data)})")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def uint(self, nbytes: int) -> int:
        return int.from_bytes(self._take(nbytes), "little")

    def f16(self, count: int) -> np.ndarray:
        return np.frombuffer(self._take(2 * count), dtype="<f2").astype(np.float32)

    def f32(self, count: int) -> np.ndarray:
        return np.frombuffer(self._take(4 * count), dtype="<f4").astype(np.float32)

    def raw(self, nbytes: int) -> bytes:
        return bytes(self._take(nbytes))

    def bits(self, count: int) -> np.ndarray:
        return unpack_bits(self._take((count + 7) // 8), count)

    def codes(self, count: int, width: int) -> np.ndarray:
        return unpack_uint(self._take(packed_uint_bytes(count, width)), count, width)

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def done(self) -> None:
        if self.remaining():
            raise ArtifactError(f"{self.what} has {self.remaining()} unexpected trailing bytes")


def count_width(limit: int) -> int:
    """Bytes needed for counts up to ``limit`` (1, 2, 4 or 8)."""
    for nbytes in (1, 2, 4, 8):
        if limit < (1 << (8 * nbytes)):
            return nbytes
    raise ValueError(f"count {limit} too large")
