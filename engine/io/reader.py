"""Lazy, validated reader of a local Hugging Face model folder (config.json + safetensors).

Opening a folder reads only small things: config.json, the sharded index and every shard's
header (parsed by our strict parser in ``engine.io.header``). Tensors are loaded one at a time
through ``safe_open`` when asked for. Pickle checkpoints are refused without being opened;
configs asking for remote code are refused; nothing is ever imported from the folder.
"""

from __future__ import annotations

import functools
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open

from engine.errors import (CheckpointFormatError, ConfigError, NonFiniteError,
                           PathNotAllowedError, UnsafeFormatError)
from engine.io.header import DuplicateKeyError, SafetensorsHeader, loads_strict_json, read_header
from engine.io.names import CONFIG_NAME, INDEX_NAME, SINGLE_NAME
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_JSON_BYTES = 64 * 2**20  # config.json and the index are small; a huge one is an attack


@dataclass(frozen=True)
class TensorInfo:
    """What a header says about one tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _regular_file_inside(folder: Path, name: str, what: str) -> Path:
    """Resolve ``folder/name`` (symlinks too); it must stay inside ``folder`` and be a file."""
    candidate = folder / name
    try:
        real = candidate.resolve(strict=True)
    except FileNotFoundError:
        raise CheckpointFormatError(f"{what} not found", path=candidate) from None
    except (OSError, RuntimeError) as err:  # RuntimeError: symlink loop on older Pythons
        raise CheckpointFormatError(f"{what} cannot be resolved: {err}", path=candidate) from None
    if folder not in real.parents:
        raise PathNotAllowedError(f"{what} resolves outside the model folder (to {real}); refused",
                                  path=candidate)
    mode = os.stat(real).st_mode
    if not stat.S_ISREG(mode):
        raise PathNotAllowedError(f"{what} is not a regular file", path=candidate)
    return real


def _read_small_json(path: Path, error_cls, what: str):
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise error_cls(f"{what} is {size} bytes, too large", path=path)
        raw = path.read_bytes()
    except OSError as err:
        raise error_cls(f"cannot read {what}: {err.strerror or err}", path=path) from None
    return _parse_small_json(raw, path, error_cls, what)


def _parse_small_json(raw: bytes, path: Path, error_cls, what: str):
    """Strict JSON (no duplicate keys, no NaN) from bytes; every failure is ``error_cls``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise error_cls(f"{what} is not UTF-8 text", path=path) from None
    try:
        return loads_strict_json(text)
    except DuplicateKeyError as dup:
        raise error_cls(f"{what} has duplicate key {dup.key!r}", path=path) from None
    except ValueError as err:
        raise error_cls(f"{what} is not valid JSON: {err}", path=path) from None
    except RecursionError:
        raise error_cls(f"{what} is nested too deeply", path=path) from None


def _remote_code_keys(config) -> list[str]:
    """Keys anywhere in the config that would make transformers import code from the folder."""
    found = []
    stack = [("", config)]  # iterative: a deeply nested config cannot exhaust the Python stack
    while stack:
        trail, node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                here = f"{trail}.{key}" if trail else key
                if key == "auto_map" or (key == "trust_remote_code" and value):
                    found.append(here)
                stack.append((here, value))
        elif isinstance(node, list):
            stack.extend((f"{trail}[{i}]", value) for i, value in enumerate(node))
    return sorted(found)


# attn_implementation values naming attention built into transformers/torch; anything else (a
# hub kernel repo such as "kernels-community/flash-attn") makes transformers fetch and run code.
BUILTIN_ATTENTION = frozenset({"eager", "sdpa", "flash_attention_2", "flash_attention_3",
                               "flex_attention"})
ATTENTION_KEYS = ("attn_implementation", "_attn_implementation", "_attn_implementation_internal")


@functools.lru_cache(maxsize=1)
def _known_tokenizer_classes() -> frozenset[str]:
    """Tokenizer class names transformers itself defines (its registry, read as data: nothing is
    imported from any folder), without the legacy "Fast" suffix."""
    from transformers.models.auto import tokenization_auto as auto

    names = {n for n in auto.TOKENIZER_MAPPING_NAMES.values() if isinstance(n, str)}
    names |= set(auto.REGISTERED_TOKENIZER_CLASSES) | set(auto.REGISTERED_FAST_ALIASES)
    names |= {"TokenizersBackend", "PythonBackend", "SentencePieceBackend", "MistralCommonBackend",
              "PreTrainedTokenizer", "PreTrainedTokenizerFast"}
    return frozenset(n.removesuffix("Fast") for n in names)


def unsafe_config_reasons(config) -> list[str]:
    """Why a config-like JSON (config.json, tokenizer_config.json, generation_config.json, ...)
    could make transformers run code that is not its own: remote-code keys anywhere, a
    tokenizer class transformers does not define, an attention implementation that is a hub
    kernel. Empty when there is none."""
    reasons = [f"{key} (remote code)" for key in _remote_code_keys(config)]
    stack = [("", config)]  # iterative, as in _remote_code_keys
    while stack:
        trail, node = stack.pop()
        if isinstance(node, list):
            stack.extend((f"{trail}[{i}]", value) for i, value in enumerate(node))
        if not isinstance(node, dict):
            continue
        for key, value in node.items():
            here = f"{trail}.{key}" if trail else key
            stack.append((here, value))
            if value is None:
                continue
            if key in ATTENTION_KEYS and value not in BUILTIN_ATTENTION:
                reasons.append(f"{here}={value!r} (not a built-in attention implementation)")
            elif key == "tokenizer_class" and (not isinstance(value, str) or value.removesuffix(
                    "Fast") not in _known_tokenizer_classes()):
                reasons.append(f"{here}={value!r} (not a tokenizer class of transformers)")
    return sorted(reasons)


def refuse_unsafe_config(config, path: Path, what: str) -> None:
    """UnsafeFormatError naming ``what`` if ``unsafe_config_reasons`` finds anything."""
    reasons = unsafe_config_reasons(config)
    if reasons:
        raise UnsafeFormatError(f"{what} asks for code outside transformers ({', '.join(reasons)}); "
                                "refused, nothing imported", path=path)


def _plain_basename(value) -> bool:
    return (isinstance(value, str) and value not in ("", ".", "..") and "/" not in value
            and "\\" not in value and "\x00" not in value and not os.path.isabs(value)
            and not (len(value) >= 2 and value[1] == ":"))  # drive letters


class ModelFolder:
    """A validated, lazily-read model folder. See the module docstring."""

    def __init__(self, path: str | Path, *, check_finite: bool = False):
        given = Path(path)
        try:
            self.path = given.resolve(strict=True)
        except FileNotFoundError:
            raise CheckpointFormatError("model folder not found", path=given) from None
        except (OSError, RuntimeError) as err:
            raise CheckpointFormatError(f"model folder cannot be resolved: {err}", path=given) from None
        if not self.path.is_dir():
            raise CheckpointFormatError("not a folder", path=given)
        self.headers: dict[Path, SafetensorsHeader] = {}
        self._infos: dict[str, TensorInfo] = {}
        self._handles: dict[Path, object] = {}
        self._fds: dict[Path, int] = {}
        # where read_tensor allocates (an engine.io.buffers.BufferPool set by a streaming job,
        # which reuses buffers nothing holds any more); None: torch.empty
        self.buffers = None
        self.index_path: Path | None = None
        try:
            self.config = self._load_config()
            self._load_weights()
        except OSError as err:  # permissions, races: still a named error, never a traceback
            raise CheckpointFormatError(f"cannot read: {err.strerror or err}",
                                        path=err.filename or self.path) from None
        if check_finite:
            self.check_finite()

    # ----------------------------------------------------------------- opening
    def _load_config(self) -> dict:
        config_path = self.path / CONFIG_NAME
        if not config_path.exists() and not config_path.is_symlink():
            raise ConfigError("config.json missing from the model folder", path=config_path)
        try:
            real = _regular_file_inside(self.path, CONFIG_NAME, "config.json")
        except CheckpointFormatError as err:
            raise ConfigError(err.reason, path=config_path) from None
        config = _read_small_json(real, ConfigError, "config.json")
        if not isinstance(config, dict):
            raise ConfigError("config.json must hold a JSON object", path=config_path)
        refuse_unsafe_config(config, config_path, "config.json")
        return config

    def _load_weights(self) -> None:
        names = sorted(os.listdir(self.path))
        has_index, has_single = INDEX_NAME in names, SINGLE_NAME in names
        if has_index and has_single:
            raise CheckpointFormatError(f"both {SINGLE_NAME} and {INDEX_NAME} present; "
                                        "ambiguous, remove one", path=self.path)
        if has_index:
            self._load_sharded()
        elif has_single:
            shard = _regular_file_inside(self.path, SINGLE_NAME, SINGLE_NAME)
            header = self._read_shard_header(shard)
            self._register(shard, header)
        else:
            pickles = [n for n in names if n.lower().endswith(PICKLE_SUFFIXES)]
            if pickles:
                raise UnsafeFormatError(f"pickle checkpoint refused ({', '.join(pickles)}): pickle "
                                        "can run code; convert it to safetensors",
                                        path=self.path / pickles[0])
            other = [n for n in names if n.endswith(".safetensors")]
            if other:
                raise CheckpointFormatError(f"no {SINGLE_NAME} or {INDEX_NAME}; found "
                                            f"{', '.join(other)} (rename a full model to "
                                            f"{SINGLE_NAME})", path=self.path)
            raise CheckpointFormatError(f"no weights: neither {SINGLE_NAME} nor {INDEX_NAME}",
                                        path=self.path)

    def _read_shard_header(self, shard: Path) -> SafetensorsHeader:
        header = read_header(shard)
        self.headers[shard] = header
        return header

    def _register(self, shard: Path, header: SafetensorsHeader) -> None:
        for name in header.order:
            entry = header.entries[name]
            self._infos[name] = TensorInfo(name, entry.shape, entry.dtype, shard, entry.nbytes)

    def _load_sharded(self) -> None:
        index_path = self.path / INDEX_NAME
        real_index = _regular_file_inside(self.path, INDEX_NAME, INDEX_NAME)
        self.index_path = index_path
        index = _read_small_json(real_index, CheckpointFormatError, INDEX_NAME)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointFormatError("index has no weight_map object", path=index_path)

        shards: dict[str, list[str]] = {}
        for tensor, shard in weight_map.items():
            if not _plain_basename(shard):
                raise PathNotAllowedError(f"weight_map value {shard!r} is not a plain file name "
                                          "(traversal or absolute path refused)",
                                          path=index_path, tensor=tensor)
            if not shard.endswith(".safetensors"):
                raise CheckpointFormatError(f"weight_map names {shard!r}, not a .safetensors file",
                                            path=index_path, tensor=tensor)
            shards.setdefault(shard, []).append(tensor)

        # Which shard holds which tensor, from the headers themselves.
        holder: dict[str, Path] = {}
        for shard_name in sorted(shards):
            shard = _regular_file_inside(self.path, shard_name, f"shard {shard_name} named by the index")
            header = self._read_shard_header(shard)
            for tensor in header.order:
                if tensor in holder:
                    raise CheckpointFormatError(f"tensor is stored in two shards: "
                                                f"{holder[tensor].name} and {shard.name}",
                                                path=shard, tensor=tensor)
                holder[tensor] = shard
        # Then the index and the headers must agree, entry by entry, both ways.
        for tensor, shard_name in weight_map.items():
            actual = holder.get(tensor)
            if actual is None:
                raise CheckpointFormatError(f"the index maps this tensor to {shard_name}, which does "
                                            "not contain it (nor does any other shard)",
                                            path=self.path / shard_name, tensor=tensor)
            if actual.name != shard_name:
                raise CheckpointFormatError(f"the index maps this tensor to {shard_name} but it is "
                                            f"stored in {actual.name}", path=index_path, tensor=tensor)
        for tensor, shard in holder.items():
            if tensor not in weight_map:
                raise CheckpointFormatError(f"tensor in shard {shard.name} is missing from {INDEX_NAME}",
                                            path=shard, tensor=tensor)
        for shard, header in self.headers.items():
            self._register(shard, header)

    # ----------------------------------------------------------------- inventory
    @property
    def tensor_names(self) -> list[str]:
        return list(self._infos)

    @property
    def shard_files(self) -> list[Path]:
        return list(self.headers)

    @property
    def num_parameters(self) -> int:
        return sum(info.numel for info in self._infos.values())

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self._infos.values())

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def file_fingerprints(self) -> dict[str, dict]:
        """Per weight file: size, mtime_ns and sha256 of its header (for cache keys)."""
        return {path.name: {"size": h.file_size, "mtime_ns": h.mtime_ns, "header_sha256": h.header_sha256}
                for path, h in self.headers.items()}

    # ----------------------------------------------------------------- tensors
    def _handle(self, shard: Path):
        handle = self._handles.get(shard)
        if handle is None:
            try:
                handle = safe_open(str(shard), framework="pt", device="cpu")
            except (SafetensorError, OSError) as err:
                raise CheckpointFormatError(f"safetensors refused the file: {err}", path=shard) from None
            self._handles[shard] = handle
        return handle

    def get_tensor(self, name: str) -> torch.Tensor:
        """Load one tensor (CPU) through safe_open; the file is opened on first use."""
        info = self.info(name)
        try:
            tensor = self._handle(info.file).get_tensor(name)
        except (SafetensorError, OSError) as err:
            raise CheckpointFormatError(f"cannot read tensor: {err}", path=info.file, tensor=name) from None
        if tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
            raise CheckpointFormatError("file changed since it was opened (shape/dtype differ)",
                                        path=info.file, tensor=name)
        return tensor

    def read_tensor(self, name: str) -> torch.Tensor:
        """Load one tensor (CPU) by reading its bytes at the validated header's offsets, without
        memory-mapping the file, so no page of the file stays in this process's resident memory
        (a streaming merge of large models then peaks at a few tensors). Thread-safe (pread).
        The file must be the one whose header was validated (size and mtime are checked)."""
        info = self.info(name)
        header = self.headers[info.file]
        entry = header.entries[name]
        fd = self._fds.get(info.file)
        if fd is None:
            try:
                fd = os.open(info.file, os.O_RDONLY)
                st = os.fstat(fd)
            except OSError as err:
                raise CheckpointFormatError(f"cannot open: {err.strerror or err}", path=info.file) from None
            if st.st_size != header.file_size or st.st_mtime_ns != header.mtime_ns:
                os.close(fd)
                raise CheckpointFormatError("file changed since it was opened (size/mtime differ)",
                                            path=info.file)
            fd = self._fds.setdefault(info.file, fd)
        buffers = self.buffers
        tensor = (buffers.empty(info.shape, info.dtype) if buffers is not None
                  else torch.empty(info.shape, dtype=info.dtype))
        if entry.nbytes == 0:
            return tensor
        view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        offset, done = header.data_start + entry.begin, 0
        try:
            while done < entry.nbytes:
                got = os.preadv(fd, [view[done:]], offset + done)
                if got <= 0:
                    raise CheckpointFormatError("file ends inside this tensor's data (truncated)",
                                                path=info.file, tensor=name)
                done += got
        except OSError as err:
            raise CheckpointFormatError(f"cannot read tensor: {err.strerror or err}", path=info.file,
                                        tensor=name) from None
        return tensor

    def iter_tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for name in (self.tensor_names if names is None else names):
            yield name, self.get_tensor(name)

    def nonfinite_counts(self, names: Iterable[str] | None = None) -> dict[str, dict[str, int]]:
        """{tensor: {"nan": n, "inf": n}} for every floating tensor holding NaN or Inf."""
        counts = {}
        for name in (self.tensor_names if names is None else names):
            if not self.info(name).dtype.is_floating_point:
                continue
            tensor = self.get_tensor(name)
            nan = int(torch.isnan(tensor).sum())
            inf = int(torch.isinf(tensor).sum())
            if nan or inf:
                counts[name] = {"nan": nan, "inf": inf}
        return counts

    def check_finite(self, names: Iterable[str] | None = None) -> None:
        """Scan tensors one at a time; NonFiniteError names the first bad tensor and the count."""
        counts = self.nonfinite_counts(names)
        if counts:
            first, c = next(iter(counts.items()))
            more = f"; {len(counts) - 1} more tensor(s) also non-finite: " + ", ".join(
                list(counts)[1:6]) if len(counts) > 1 else ""
            raise NonFiniteError(f"{c['nan']} NaN and {c['inf']} Inf of {self.info(first).numel} "
                                 f"values{more}", path=self.info(first).file, tensor=first)

    # ----------------------------------------------------------------- lifetime
    def close(self) -> None:
        self._handles.clear()
        fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> "ModelFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ModelFolder({str(self.path)!r}, tensors={len(self._infos)})"
