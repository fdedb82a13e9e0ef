"""The on-disk format of a compressed delta, written atomically and read back with checks.

An artifact is a folder::

    manifest.json        method, parameters, base fingerprint, per-file sha256 (compact JSON)
    delta.safetensors    "offsets" (int, one more than the compressed matrices),
                         "vectors" (fp16: every 1-D delta, concatenated in layout order),
                         "payload" (uint8: the compressed matrices' sections, concatenated)
    files/<name>         the fine-tune's config/tokenizer files that are not byte-identical
                         to the base's (identical ones are referenced by sha256 and copied from
                         the base at rebuild; ``side_files="embed"`` stores them all)

The tensor layout (names, shapes, order) is the base's: the manifest keeps its sha256, so an
artifact only rebuilds against the base it was made from. Sections are opaque to the format:
each compressor writes and reads its own (``engine.compress.bits``). Sizes are what they are
on disk: ``ratio = 2 * delta_entries / bytes of every file in the folder``.

Writing follows ``engine.io.writer``: a staging folder beside the destination (with an owner
lock, swept if orphaned), payload streamed to a temporary file section by section, then the
safetensors file assembled (header first, data copied in chunks), side files and manifest,
fsync, verification by reopening, one rename. Any failure removes the staging folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import engine
from engine.errors import ArtifactError, DeltaWorkbenchError, ExportError
from engine.io.header import loads_strict_json, read_header
from engine.io.side_files import SIDE_FILES, read_side_file
from engine.io.staging import (LOCK_NAME, check_destination, discard_staging,
                                make_staging_with_parents, unregister_staging)
from engine.io.writer import _fsync_dir, _write_bytes, sha256_file

FORMAT = "delta-workbench/compressed-delta"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TENSORS_NAME = "delta.safetensors"
FILES_DIR = "files"
MAX_MANIFEST_BYTES = 16 * 2**20
_COPY_CHUNK = 1 << 22


def layout_digest(layout: list[tuple[str, tuple[int, ...]]]) -> str:
    """sha256 of the tensor layout (names and shapes, in order)."""
    text = json.dumps([[name, list(shape)] for name, shape in layout], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def folder_bytes(path: str | Path) -> int:
    """Bytes of every regular file under ``path`` (what the ratio's denominator counts)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            total += os.lstat(os.path.join(root, name)).st_size
    return total


def compact_json(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def safetensors_header(sizes: dict[str, tuple[str, int, int]]) -> bytes:
    """The 8-byte length plus padded JSON header for 1-D tensors {name: (dtype, count, nbytes)}
    laid out in the given order."""
    header, cursor = {}, 0
    for name, (dtype, count, nbytes) in sizes.items():
        header[name] = {"dtype": dtype, "shape": [count], "data_offsets": [cursor, cursor + nbytes]}
        cursor += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)  # keep the data area 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def offsets_dtype(payload_bytes: int) -> tuple[str, np.dtype]:
    return ("I32", np.dtype("<i4")) if payload_bytes < 2**31 else ("I64", np.dtype("<i8"))


class ArtifactWriter:
    """Build an artifact in a staging folder; ``finalize`` renames it into place."""

    def __init__(self, dest: str | Path, *, input_folders: list[str | Path] = ()):
        self.dest = Path(dest).absolute()
        self.input_folders = [Path(p) for p in input_folders]
        self.staging: Path | None = None
        self._payload = None
        self._vectors = None
        self.offsets = [0]
        self.vector_count = 0
        self._created_parents: list[Path] = []

    # ------------------------------------------------------------ lifetime
    def __enter__(self) -> "ArtifactWriter":
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.abort()
        return False

    def _check_destination(self) -> None:
        check_destination(self.dest, self.input_folders)

    def open(self) -> "ArtifactWriter":
        self._check_destination()
        try:
            self.staging, self._created_parents = make_staging_with_parents(self.dest)
            self._payload = open(self.staging / "payload.tmp", "wb")
            self._vectors = open(self.staging / "vectors.tmp", "wb")
        except OSError as err:
            self.abort()
            raise ExportError(f"cannot create the staging folder: {err.strerror or err}",
                              path=self.dest) from None
        return self

    def abort(self) -> None:
        for handle in (self._payload, self._vectors):
            if handle is not None and not handle.closed:
                handle.close()
        discard_staging(self.staging, self._created_parents)
        self.staging = None

    # ------------------------------------------------------------ content
    def add_section(self, data: bytes) -> None:
        self._payload.write(data)
        self.offsets.append(self.offsets[-1] + len(data))

    def add_vector(self, values: torch.Tensor) -> None:
        arr = values.detach().to("cpu", torch.float32).reshape(-1).numpy()
        half = arr.astype("<f2")
        if not np.isfinite(half).all():
            raise ArtifactError("a 1-D delta overflows float16")
        self._vectors.write(half.tobytes())
        self.vector_count += arr.size

    def rewrite_sections(self, patch) -> None:
        """Replace every section by ``patch(index, old_bytes)`` (same order; sizes may change)."""
        self._payload.close()
        old_path = self.staging / "payload.tmp"
        new_path = self.staging / "payload.rewrite.tmp"
        offsets = [0]
        with open(old_path, "rb") as src, open(new_path, "wb") as dst:
            for i in range(len(self.offsets) - 1):
                data = src.read(self.offsets[i + 1] - self.offsets[i])
                new = patch(i, data)
                dst.write(new)
                offsets.append(offsets[-1] + len(new))
        os.replace(new_path, old_path)
        self.offsets = offsets
        self._payload = open(old_path, "ab")

    def read_section(self, index: int) -> bytes:
        self._payload.flush()
        with open(self.staging / "payload.tmp", "rb") as handle:
            handle.seek(self.offsets[index])
            return handle.read(self.offsets[index + 1] - self.offsets[index])

    def read_vectors(self) -> np.ndarray:
        self._vectors.flush()
        return np.fromfile(self.staging / "vectors.tmp", dtype="<f2").astype(np.float32)

    # ------------------------------------------------------------ finishing
    def tensor_sizes(self, payload_bytes: int | None = None, matrices: int | None = None,
                     vectors: int | None = None) -> dict[str, tuple[str, int, int]]:
        payload_bytes = self.offsets[-1] if payload_bytes is None else payload_bytes
        matrices = len(self.offsets) - 1 if matrices is None else matrices
        vectors = self.vector_count if vectors is None else vectors
        odt_name, odt = offsets_dtype(payload_bytes)
        sizes = {"offsets": (odt_name, matrices + 1, (matrices + 1) * odt.itemsize)}
        if vectors:
            sizes["vectors"] = ("F16", vectors, 2 * vectors)
        if payload_bytes:
            sizes["payload"] = ("U8", payload_bytes, payload_bytes)
        return sizes

    def finalize(self, manifest: dict, side_files: dict[str, bytes]) -> Path:
        """Assemble delta.safetensors, write side files and the manifest, verify, rename."""
        try:
            return self._finalize(manifest, side_files)
        except BaseException as err:
            self.abort()
            if isinstance(err, (DeltaWorkbenchError, KeyboardInterrupt, SystemExit)):
                raise
            detail = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            raise ExportError(f"writing the artifact failed: {type(err).__name__}: {detail}",
                              path=self.dest) from err

    def _finalize(self, manifest: dict, side_files: dict[str, bytes]) -> Path:
        staging = self.staging
        self._payload.close()
        self._vectors.close()
        sizes = self.tensor_sizes()
        odt = offsets_dtype(self.offsets[-1])[1]
        target = staging / TENSORS_NAME
        with open(target, "wb") as out:
            out.write(safetensors_header(sizes))
            out.write(np.asarray(self.offsets, dtype=odt).tobytes())
            for name in ("vectors", "payload"):
                if name in sizes:
                    with open(staging / f"{name}.tmp", "rb") as src:
                        shutil.copyfileobj(src, out, _COPY_CHUNK)
            out.flush()
            os.fsync(out.fileno())
        os.unlink(staging / "payload.tmp")
        os.unlink(staging / "vectors.tmp")
        if side_files:
            (staging / FILES_DIR).mkdir()
            for name, data in side_files.items():
                _write_bytes(staging / FILES_DIR / name, data)
            _fsync_dir(staging / FILES_DIR)
        files = {TENSORS_NAME: {"sha256": sha256_file(target), "size": target.stat().st_size}}
        for name in side_files:
            path = staging / FILES_DIR / name
            files[f"{FILES_DIR}/{name}"] = {"sha256": sha256_file(path), "size": path.stat().st_size}
        manifest = dict(manifest, files=files)
        _write_bytes(staging / MANIFEST_NAME, compact_json(manifest))
        _fsync_dir(staging)
        (staging / LOCK_NAME).unlink()
        Artifact(staging, verify=True, expect_complete=True)  # reopen: header, sizes, sha256
        self._check_destination()
        os.rename(staging, self.dest)
        self.staging = None
        unregister_staging(staging)
        _fsync_dir(self.dest.parent)
        self._created_parents.clear()
        return self.dest


@dataclass
class SideFile:
    name: str
    sha256: str
    size: int
    stored: bool  # True: in files/; False: copied from the base at rebuild


class Artifact:
    """A validated artifact folder: manifest read strictly, every file present with its
    recorded size (and sha256 unless ``verify=False``), no unexpected files, the safetensors
    header parsed by our strict reader and consistent with the manifest."""

    def __init__(self, path: str | Path, *, verify: bool = True, expect_complete: bool = True):
        given = Path(path)
        try:
            self.path = given.resolve(strict=True)
        except (FileNotFoundError, OSError, RuntimeError):
            raise ArtifactError("artifact folder not found", path=given) from None
        if not self.path.is_dir():
            raise ArtifactError("not a folder", path=given)
        self.manifest = self._read_manifest()
        self._check_files(verify)
        self._read_tensors_header()
        self._handle = None

    # ------------------------------------------------------------ manifest
    def _read_manifest(self) -> dict:
        path = self.path / MANIFEST_NAME
        if not path.is_file() or path.is_symlink():
            raise ArtifactError("manifest.json missing (not an artifact, or incomplete)", path=path)
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ArtifactError("manifest.json is too large", path=path)
        try:
            manifest = loads_strict_json(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as err:
            raise ArtifactError(f"manifest.json is corrupt: {err}", path=path) from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ArtifactError(f"manifest.json does not describe a {FORMAT} artifact", path=path)
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(f"artifact format version {manifest.get('format_version')!r} is not "
                                f"supported (this engine reads {FORMAT_VERSION})", path=path)
        required = {"method": str, "params": dict, "base": dict, "files": dict, "layout": dict,
                    "side_files": dict, "delta_entries": int}
        for key, kind in required.items():
            if not isinstance(manifest.get(key), kind):
                raise ArtifactError(f"manifest.json lacks a valid {key!r}", path=path)
        return manifest

    def _check_files(self, verify: bool) -> None:
        files = self.manifest["files"]
        if TENSORS_NAME not in files:
            raise ArtifactError(f"manifest lists no {TENSORS_NAME}", path=self.path / MANIFEST_NAME)
        expected = set(files) | {MANIFEST_NAME}
        for root, dirs, names in os.walk(self.path):
            for name in names + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
                rel = os.path.relpath(os.path.join(root, name), self.path).replace(os.sep, "/")
                if rel not in expected:
                    raise ArtifactError("unexpected file in the artifact folder (not in the manifest)",
                                        path=self.path / rel)
        for rel, entry in files.items():
            parts = rel.split("/")
            if (not isinstance(entry, dict) or not all(p not in ("", ".", "..") for p in parts)
                    or len(parts) > 2 or (len(parts) == 2 and parts[0] != FILES_DIR)):
                raise ArtifactError(f"manifest lists a bad file entry {rel!r}", path=self.path / MANIFEST_NAME)
            path = self.path / rel
            if not path.is_file() or path.is_symlink():
                raise ArtifactError("file listed in the manifest is missing", path=path)
            size = path.stat().st_size
            if size != entry.get("size"):
                raise ArtifactError(f"file is {size} bytes, the manifest says {entry.get('size')} "
                                    "(truncated or altered)", path=path)
            if verify and sha256_file(path) != entry.get("sha256"):
                raise ArtifactError("sha256 differs from the manifest (corrupt or altered)", path=path)

    def _read_tensors_header(self) -> None:
        path = self.path / TENSORS_NAME
        try:
            header = read_header(path)
        except DeltaWorkbenchError as err:
            raise ArtifactError(err.reason, path=path) from None
        layout = self.manifest["layout"]
        matrices, vectors = layout.get("matrices"), layout.get("vector_entries")
        if not isinstance(matrices, int) or not isinstance(vectors, int):
            raise ArtifactError("manifest layout lacks matrix/vector counts", path=self.path / MANIFEST_NAME)
        entries = header.entries
        offsets = entries.get("offsets")
        if offsets is None or offsets.shape != (matrices + 1,) or offsets.dtype_name not in ("I32", "I64"):
            raise ArtifactError(f"'offsets' must hold {matrices + 1} integers", path=path)
        if vectors and (("vectors" not in entries) or entries["vectors"].shape != (vectors,)
                        or entries["vectors"].dtype_name != "F16"):
            raise ArtifactError(f"'vectors' must hold {vectors} fp16 values", path=path)
        extra = set(entries) - {"offsets", "vectors", "payload"}
        if extra:
            raise ArtifactError(f"unexpected tensors {sorted(extra)}", path=path)
        self.header = header
        self.matrices, self.vector_entries = matrices, vectors
        raw = np.fromfile(path, dtype=np.uint8, count=offsets.nbytes,
                          offset=header.data_start + offsets.begin)
        self.offsets = raw.view("<i4" if offsets.dtype_name == "I32" else "<i8").astype(np.int64)
        payload = entries.get("payload")
        payload_size = payload.shape[0] if payload is not None else 0
        if (self.offsets[0] != 0 or self.offsets[-1] != payload_size
                or (np.diff(self.offsets) < 0).any()):
            raise ArtifactError("section offsets are inconsistent with the payload", path=path)

    # ------------------------------------------------------------ access
    @property
    def method(self) -> str:
        return self.manifest["method"]

    @property
    def params(self) -> dict:
        return self.manifest["params"]

    @property
    def total_bytes(self) -> int:
        return folder_bytes(self.path)

    @property
    def ratio(self) -> float:
        return 2.0 * self.manifest["delta_entries"] / self.total_bytes

    def _raw(self, name: str, begin: int, end: int) -> bytes:
        entry = self.header.entries[name]
        with open(self.path / TENSORS_NAME, "rb") as handle:
            handle.seek(self.header.data_start + entry.begin + begin)
            data = handle.read(end - begin)
        if len(data) != end - begin:
            raise ArtifactError("file shrank while reading", path=self.path / TENSORS_NAME)
        return data

    def section(self, index: int) -> bytes:
        if not 0 <= index < self.matrices:
            raise IndexError(index)
        begin, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return self._raw("payload", begin, end) if end > begin else b""

    def vectors(self) -> np.ndarray:
        if not self.vector_entries:
            return np.zeros(0, dtype=np.float32)
        return np.frombuffer(self._raw("vectors", 0, 2 * self.vector_entries),
                             dtype="<f2").astype(np.float32)

    def payload(self) -> bytes:
        end = int(self.offsets[-1])
        return self._raw("payload", 0, end) if end else b""

    def side_files(self) -> list[SideFile]:
        """Config/tokenizer files: those stored in files/ and those referenced from the base."""
        entry = self.manifest["side_files"]
        stored, from_base = entry.get("stored", []), entry.get("from_base", [])
        if not isinstance(stored, list) or not isinstance(from_base, list):
            raise ArtifactError("manifest has a bad side_files entry", path=self.path / MANIFEST_NAME)
        out = []
        for name in stored + from_base:
            # only the known side files: an artifact never restores a .py file or anything else
            if not isinstance(name, str) or name not in SIDE_FILES:
                raise ArtifactError(f"manifest has a bad side-file name {name!r} (not one of the "
                                    "config/tokenizer files an artifact may carry)",
                                    path=self.path / MANIFEST_NAME)
        for name in stored:
            listed = self.manifest["files"].get(f"{FILES_DIR}/{name}")
            if not isinstance(listed, dict):
                raise ArtifactError(f"side file {name!r} is marked stored but not listed",
                                    path=self.path / MANIFEST_NAME)
            out.append(SideFile(name, str(listed.get("sha256")), int(listed.get("size", -1)), True))
        out.extend(SideFile(name, "", -1, False) for name in from_base)
        return out

    def side_file_bytes(self, base_path: Path) -> dict[str, bytes]:
        """Every side file's bytes: stored ones (sha256 checked with the folder) and the base's
        copies of the others (checked together against the manifest's digest)."""
        out, referenced = {}, []
        for side in self.side_files():
            # the artifact and the base are hostile too: read and vetted as a model folder's
            # side files are (inside, regular, bounded, no config asking for code)
            folder = self.path / FILES_DIR if side.stored else Path(base_path)
            data = read_side_file(folder, side.name)
            if data is None:
                where = "in the artifact" if side.stored else \
                    "in the base (the artifact references the base's copy; wrong base?)"
                raise ArtifactError(f"{side.name} not found {where}", path=folder / side.name)
            out[side.name] = data
            if not side.stored:
                referenced.append((side.name, out[side.name]))
        digest = side_files_digest(referenced)
        if referenced and digest != self.manifest["side_files"].get("from_base_sha256"):
            raise ArtifactError(f"the base's copies of {', '.join(n for n, _ in referenced)} differ from "
                                "the ones the artifact was made against (wrong base?)", path=Path(base_path))
        return out


def side_files_digest(files: list[tuple[str, bytes]]) -> str:
    """One sha256 over (name, sha256 of content) pairs, in order."""
    text = "".join(f"{name}\0{hashlib.sha256(data).hexdigest()}\n" for name, data in files)
    return hashlib.sha256(text.encode()).hexdigest()


def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def engine_version() -> str:
    return engine.__version__


# ---------------------------------------------------------------- the base an artifact was made against
def layout_of(folder) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(folder.info(name).shape)) for name in folder.tensor_names]


def base_fingerprint(folder, *, content: bool = True) -> dict:
    files = {}
    for name, fp in folder.file_fingerprints().items():
        entry = dict(fp)
        if content:
            entry["sha256"] = sha256_file(folder.path / name)
        files[name] = entry
    return {"layout_sha256": layout_digest(layout_of(folder)), "files": files}


def check_base(artifact: "Artifact", base, *, verify_content: bool = True) -> None:
    """Refuse a base the artifact was not made against, with a one-line reason."""
    expected = artifact.manifest["base"]
    files = expected.get("files") or {}
    actual = base.file_fingerprints()
    layout = layout_of(base)
    if layout_digest(layout) != expected.get("layout_sha256"):
        n = artifact.manifest["layout"].get("tensors")
        sizes = ", ".join(f"{k} {v.get('size')} bytes" for k, v in files.items())
        raise ArtifactError(f"wrong base: its tensor names/shapes differ from the base the artifact "
                            f"was made against ({n} tensors; {sizes}); this base has {len(layout)} "
                            "tensors", path=base.path)
    if sorted(actual) != sorted(files):
        raise ArtifactError(f"wrong base: weight files {sorted(actual)} differ from the artifact's "
                            f"base {sorted(files)}", path=base.path)
    for name, fp in files.items():
        if actual[name]["size"] != fp.get("size") or actual[name]["header_sha256"] != fp.get("header_sha256"):
            raise ArtifactError(f"wrong base: {name} is {actual[name]['size']} bytes (header "
                                f"{actual[name]['header_sha256'][:12]}), the artifact's base had "
                                f"{fp.get('size')} bytes (header {str(fp.get('header_sha256'))[:12]})",
                                path=base.path)
        if verify_content and "sha256" in fp:
            digest = sha256_file(base.path / name)
            if digest != fp["sha256"]:
                raise ArtifactError(f"wrong base: {name} has the same layout but other weights "
                                    f"(sha256 {digest[:12]}, the artifact's base {fp['sha256'][:12]})",
                                    path=base.path)
