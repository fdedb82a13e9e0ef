"""Explicit opt-in loader for pickle checkpoints (.bin/.pt/.pth), restricted to plain tensors.

Only ``torch.load(..., weights_only=True)`` is used: its unpickler accepts tensors, plain
containers and numbers, and refuses every other global (so a ``__reduce__`` payload never
runs). There is no fallback to the unrestricted unpickler, ever: a file it refuses stays refused.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.errors import CheckpointFormatError, UnsafeFormatError


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
