"""Which device the engine computes on: CUDA when present, CPU otherwise."""

from __future__ import annotations

import torch


def compute_device() -> torch.device:
    """The device for heavy tensor work: the first CUDA device if there is one, else CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device a caller asked for (None: ``compute_device()``), refused with a one-line
    ParameterError when it is not cpu/cuda or is cuda on a machine without one, so no entry
    point (CLI, job, page) fails later with a torch traceback."""
    from engine.errors import ParameterError

    if device is None:
        return compute_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ParameterError(f"unknown device {device!r} (use cpu or cuda)") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ParameterError(f"unsupported device {str(device)!r} (use cpu or cuda)")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError("--device cuda asked for, but no CUDA device is available")
    return resolved


def describe_device() -> str:
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"CUDA: {props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return f"CPU ({torch.get_num_threads()} threads)"
