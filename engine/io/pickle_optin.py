"""The one door for pickle checkpoints (.bin/.pt/.pth): convert them to safetensors, restricted
to plain tensors (``python -m engine convert-pickle IN.bin [IN2.bin ...] --out DIR``).

Only ``torch.load(..., weights_only=True)`` is used: its unpickler accepts tensors, plain
containers and numbers, and refuses every other global (so a ``__reduce__`` payload never
runs). There is no fallback to the unrestricted unpickler, ever: a file it refuses stays refused.
Everything else in the workbench reads safetensors only; a converted folder is then read like
any other, with its config.json and tokenizer files carried over only after the same checks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from engine.errors import CheckpointFormatError, UnsafeFormatError
from engine.io.header import TORCH_TO_SAFETENSORS
from engine.io.reader import CONFIG_NAME


def load_pickle_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a flat {name: tensor} state dict from a pickle checkpoint with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointFormatError("pickle checkpoint not found or not a regular file", path=path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError, ...: all refusals, no retry
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsafeFormatError(f"refused by the weights-only loader: {first_line}", path=path) from None
    if not isinstance(loaded, dict) or not loaded:
        raise CheckpointFormatError(f"expected a non-empty dict of tensors, found {type(loaded).__name__}",
                                    path=path)
    for name, value in loaded.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CheckpointFormatError(f"entry {name!r} is {type(value).__name__}, not a tensor", path=path)
    return loaded


def convert_pickle(paths: Sequence[str | Path], out: str | Path) -> Path:
    """Write the tensors of one pickle checkpoint (or of its shards, all in one folder) as a
    safetensors model folder at ``out``, with the vetted config.json and tokenizer files found
    beside them. Every shard is loaded and checked before anything is written; ``out`` appears
    whole or not at all."""
    from engine.io.side_files import SIDE_FILES, read_side_files
    from engine.io.writer import ModelWriter

    paths = [Path(p).absolute() for p in paths]
    if not paths:
        raise CheckpointFormatError("no pickle checkpoint given", path=str(out))
    folder = paths[0].parent
    for path in paths[1:]:
        if path.parent != folder:
            raise CheckpointFormatError(f"shards of one checkpoint lie in one folder, not also {folder}",
                                        path=path)
    tensors: dict[str, torch.Tensor] = {}
    for path in paths:
        for name, tensor in load_pickle_state_dict(path).items():
            if name in tensors:
                raise CheckpointFormatError("tensor stored in two shards", path=path, tensor=name)
            if tensor.layout is not torch.strided or tensor.is_quantized or tensor.dtype not in TORCH_TO_SAFETENSORS:
                raise CheckpointFormatError(f"a {tensor.layout} {tensor.dtype} tensor has no safetensors form",
                                            path=path, tensor=name)
            tensors[name] = tensor
    side = read_side_files(folder, SIDE_FILES)
    if CONFIG_NAME not in side:
        raise CheckpointFormatError(f"no {CONFIG_NAME} beside the checkpoint: the converted folder "
                                    "would be no model folder", path=folder / CONFIG_NAME)
    config = json.loads(side.pop(CONFIG_NAME))  # vetted: strict JSON, no remote code
    if not isinstance(config, dict):
        raise CheckpointFormatError(f"{CONFIG_NAME} must hold a JSON object", path=folder / CONFIG_NAME)
    manifest = {"converted_from": [p.name for p in paths], "loader": "torch.load(weights_only=True)"}
    with ModelWriter(out, config=config, extra_files=side, manifest_extra=manifest,
                     input_folders=[folder]) as writer:
        for name, tensor in tensors.items():
            writer.add_tensor(name, tensor)
    return writer.dest
