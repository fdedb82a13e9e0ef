"""Our own strict parser of a safetensors header, run before safetensors ever opens the file.

Layout of a safetensors file: 8 bytes little-endian header length N, N bytes of UTF-8 JSON,
then the data area. The JSON maps tensor names to {"dtype", "shape", "data_offsets": [begin,
end]} (offsets relative to the data area) plus an optional "__metadata__" of str -> str.

safetensors itself checks most of this, but not duplicated keys (json keeps the last one, so a
crafted file can hide a tensor), and its errors are not named workbench errors. Here every
problem becomes a CheckpointFormatError naming the file (and the tensor where there is one).
Pickle or zip bytes in a ``.safetensors`` file are recognised and refused without unpickling.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.errors import CheckpointFormatError

# safetensors dtype names -> (torch dtype, bytes per element). Only dtypes torch can hold.
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U64": (torch.uint64, 8),
    "U32": (torch.uint32, 4),
    "U16": (torch.uint16, 2),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
TORCH_TO_SAFETENSORS = {dtype: name for name, (dtype, _) in DTYPES.items()}

# safetensors refuses headers above 100 MB; so do we (a bigger length is a corrupt or hostile file).
MAX_HEADER_BYTES = 100_000_000
INT64_MAX = 2**63 - 1  # torch sizes are int64
PICKLE_PROTOCOL_BYTE = 0x80
ZIP_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor as the header describes it."""

    name: str
    dtype: torch.dtype
    dtype_name: str
    shape: tuple[int, ...]
    begin: int  # offsets relative to the data area
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass
class SafetensorsHeader:
    """A validated header: tensors in data-offset order, metadata, where the data starts."""

    path: Path
    entries: dict[str, HeaderEntry]
    metadata: dict[str, str] | None
    data_start: int  # absolute file offset of the data area
    file_size: int
    header_sha256: str
    mtime_ns: int = 0
    order: list[str] = field(default_factory=list)


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    """json object_pairs_hook: a key that appears twice is an error, never 'last one wins'."""
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise DuplicateKeyError(key)
        seen[key] = value
    return seen


class DuplicateKeyError(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _refuse_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def loads_strict_json(text: str | bytes):
    """json.loads that refuses duplicate keys and NaN/Infinity literals (raises ValueError)."""
    return json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_refuse_constant)


def looks_like_pickle_or_zip(prefix: bytes) -> str | None:
    """Name the format if the first bytes are a pickle stream or a zip (torch.save) archive."""
    if prefix.startswith(ZIP_MAGIC):
        return "a zip archive (torch.save checkpoint)"
    if len(prefix) >= 2 and prefix[0] == PICKLE_PROTOCOL_BYTE and 2 <= prefix[1] <= 5:
        return "a pickle stream"
    return None


def _fail(path: Path, message: str, tensor: str | None = None) -> CheckpointFormatError:
    return CheckpointFormatError(message, path=path, tensor=tensor)


def _as_int(value) -> int | None:
    # bool is an int subclass in Python; a JSON true is not a size.
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def read_header(path: str | Path) -> SafetensorsHeader:
    """Parse and validate the header of one safetensors file; never touches torch or pickle."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            st = os.fstat(handle.fileno())
            file_size = st.st_size
            prefix = handle.read(min(file_size, 8))
            if len(prefix) < 8:
                raise _fail(path, f"file is {file_size} bytes, too small to be safetensors")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len == 0 or header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
                foreign = looks_like_pickle_or_zip(prefix)
                if foreign:
                    raise _foreign(path, foreign)
                raise _fail(path, f"header length {header_len} does not fit a {file_size}-byte "
                                  "file (truncated or not safetensors)")
            raw = handle.read(header_len)
    except OSError as err:
        raise _fail(path, f"cannot read file: {err.strerror or err}") from None
    if len(raw) != header_len:
        raise _fail(path, "file shrank while reading its header")
    if not raw.startswith(b"{"):
        foreign = looks_like_pickle_or_zip(prefix + raw[:8])
        if foreign:
            raise _foreign(path, foreign)
        raise _fail(path, "header is not a JSON object")
    try:
        parsed = loads_strict_json(raw.decode("utf-8"))
    except DuplicateKeyError as dup:
        raise _fail(path, f"duplicate key {dup.key!r} in header (a hidden second tensor)",
                    tensor=dup.key) from None
    except (UnicodeDecodeError, ValueError) as err:
        raise _fail(path, f"header is not valid JSON: {err}") from None
    except RecursionError:
        raise _fail(path, "header JSON is nested too deeply") from None
    if not isinstance(parsed, dict):
        raise _fail(path, "header is not a JSON object")

    metadata = parsed.pop("__metadata__", None)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise _fail(path, "__metadata__ must map strings to strings (non-string metadata)")

    data_start = 8 + header_len
    data_len = file_size - data_start
    entries = {name: _entry(path, name, spec, file_size, data_len) for name, spec in parsed.items()}

    # Offsets must tile the data area exactly: no overlap, no gap, nothing after the last tensor.
    order = sorted(entries.values(), key=lambda e: (e.begin, e.end))
    cursor = 0
    for entry in order:
        if entry.begin < cursor:
            raise _fail(path, f"data offsets [{entry.begin}, {entry.end}] overlap another tensor",
                        tensor=entry.name)
        if entry.begin > cursor:
            raise _fail(path, f"gap of {entry.begin - cursor} bytes before this tensor's data",
                        tensor=entry.name)
        cursor = entry.end
    if cursor > data_len:
        raise _fail(path, f"data area is {data_len} bytes but tensors need {cursor} (truncated file)")
    if cursor < data_len:
        raise _fail(path, f"{data_len - cursor} bytes of trailing data after the last tensor")

    return SafetensorsHeader(
        path=path,
        entries=entries,
        metadata=metadata,
        data_start=data_start,
        file_size=file_size,
        header_sha256=hashlib.sha256(raw).hexdigest(),
        mtime_ns=st.st_mtime_ns,
        order=[e.name for e in order],
    )


def _foreign(path: Path, what: str) -> CheckpointFormatError:
    return _fail(path, f"looks like {what}, not safetensors; refused without loading "
                       "(pickle data can run code)")


def _bounded_nbytes(shape: list[int], itemsize: int, limit: int) -> int | None:
    """Bytes of a tensor of ``shape``, or None once they pass ``limit``: the product is cut
    short, so a header listing a million dimensions cannot build one huge integer."""
    if 0 in shape:
        return 0
    total = itemsize
    for dim in shape:
        total *= dim
        if total > limit:
            return None
    return total


def _entry(path: Path, name: str, spec, file_size: int, data_len: int) -> HeaderEntry:
    if not name:
        raise _fail(path, "empty tensor name in header")
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise _fail(path, "entry must have exactly dtype, shape and data_offsets", tensor=name)
    dtype_name = spec["dtype"]
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise _fail(path, f"unknown dtype {dtype_name!r}", tensor=name)
    dtype, itemsize = DTYPES[dtype_name]
    shape = spec["shape"]
    if not isinstance(shape, list) or any(_as_int(d) is None or d < 0 for d in shape):
        raise _fail(path, f"shape {shape!r} is not a list of non-negative integers", tensor=name)
    # No real dimension exceeds the file's byte size, even of an empty tensor ([0, 2**64] has
    # no data, but torch overflows allocating it). Checked before anything multiplies them.
    too_big = next((d for d in shape if d > file_size), None)
    if too_big is not None:
        raise _fail(path, f"shape dimension {too_big} is larger than the whole {file_size}-byte file",
                    tensor=name)
    offsets = spec["data_offsets"]
    if (not isinstance(offsets, list) or len(offsets) != 2
            or any(_as_int(o) is None or o < 0 for o in offsets)):
        raise _fail(path, f"data_offsets {offsets!r} is not [begin, end]", tensor=name)
    begin, end = offsets
    if end < begin:
        raise _fail(path, f"data_offsets [{begin}, {end}] end before they begin", tensor=name)
    expected = _bounded_nbytes(shape, itemsize, INT64_MAX)
    if expected is None or expected > data_len:
        needs = "more than 2**63" if expected is None else expected
        raise _fail(path, f"shape {tuple(shape)} of {dtype_name} needs {needs} bytes but the "
                          f"file's data area holds {data_len}", tensor=name)
    if end - begin != expected:
        raise _fail(path, f"shape {tuple(shape)} of {dtype_name} needs {expected} bytes but "
                          f"data_offsets span {end - begin}", tensor=name)
    return HeaderEntry(name, dtype, dtype_name, tuple(shape), begin, end)

