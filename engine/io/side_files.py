"""Side files of a model folder: everything besides the weights that is read or copied.

Tokenizer files, generation config, chat templates are read as the weights and config.json
are: the name must resolve inside the folder to a regular file (a symlink out of it, a FIFO, a
folder are refused), the size is bounded, and a JSON one is parsed strictly and refused if it
asks for code that is not transformers' own (``refuse_unsafe_config``).

transformers never opens a model folder itself: ``transformers_view`` copies the vetted files
into a private temporary folder and hands it that, so a Python file, a symlink, or any file not
in ``SIDE_FILES`` is simply not there for it to find.
"""

from __future__ import annotations

import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from engine.errors import CheckpointFormatError, ConfigError
from engine.io.reader import CONFIG_NAME, _parse_small_json, _regular_file_inside, refuse_unsafe_config

# Every file besides the weights that is ever read from a model folder or copied into an output.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja",
    "chat_template.json",
)
SIDE_FILES = (CONFIG_NAME, "generation_config.json", *TOKENIZER_FILES)
# The largest real tokenizer.json files are a few tens of MB; a bigger side file is an attack.
MAX_SIDE_FILE_BYTES = 64 * 2**20


def read_side_file(folder: str | Path, name: str) -> bytes | None:
    """The vetted bytes of ``folder/name``, or None when there is no such entry.

    Raises PathNotAllowedError (resolves outside the folder, not a regular file),
    ConfigError (too large, unreadable, malformed JSON) or UnsafeFormatError (asks for code)."""
    if name not in SIDE_FILES:
        raise ConfigError(f"{name!r} is not a side file the workbench reads or restores",
                          path=Path(folder) / name)
    try:
        root = Path(folder).resolve(strict=True)
    except (OSError, RuntimeError) as err:
        raise CheckpointFormatError(f"folder cannot be resolved: {err}", path=folder) from None
    candidate = root / name
    if not candidate.exists() and not candidate.is_symlink():
        return None
    real = _regular_file_inside(root, name, name)
    try:
        # O_NONBLOCK: a file swapped for a FIFO after the check cannot hang the open
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError as err:
        raise ConfigError(f"cannot read {name}: {err.strerror or err}", path=candidate) from None
    with os.fdopen(fd, "rb") as handle:
        st = os.fstat(handle.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{name} is not a regular file", path=candidate)
        data = handle.read(MAX_SIDE_FILE_BYTES + 1)
    if len(data) > MAX_SIDE_FILE_BYTES:
        raise ConfigError(f"{name} is over {MAX_SIDE_FILE_BYTES} bytes, too large", path=candidate)
    vet_side_file(name, data, candidate)
    return data


def vet_side_file(name: str, data: bytes, path: Path) -> None:
    """A JSON side file must be strict JSON that asks for no outside code; the others are
    opaque data (the tokenizer library parses them, and its errors are caught by the caller)."""
    if name.endswith(".json"):
        refuse_unsafe_config(_parse_small_json(data, path, ConfigError, name), path, name)


def read_side_files(folder: str | Path, names: Iterable[str] = SIDE_FILES) -> dict[str, bytes]:
    """``{name: vetted bytes}`` of each of ``names`` present in ``folder``."""
    out = {}
    for name in names:
        data = read_side_file(folder, name)
        if data is not None:
            out[name] = data
    return out


@contextmanager
def transformers_view(folder: str | Path, names: Iterable[str] = SIDE_FILES) -> Iterator[Path]:
    """A private temporary folder holding only the vetted side files of ``folder``: what a
    transformers loader is given instead of the model folder. Removed on exit."""
    files = read_side_files(folder, names)
    with tempfile.TemporaryDirectory(prefix="delta-workbench-view-") as tmp:
        view = Path(tmp)
        for name, data in files.items():
            (view / name).write_bytes(data)
        yield view
