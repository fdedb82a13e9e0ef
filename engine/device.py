"""Which device the engine computes on: CUDA when present, CPU otherwise."""

from __future__ import annotations

import torch


def compute_device() -> torch.device:
    """The device for heavy tensor work: the first CUDA device if there is one, else CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def describe_device() -> str:
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"CUDA: {props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return f"CPU ({torch.get_num_threads()} threads)"
