"""Per-tensor calls into a compressor, shared by encoding, rebuilding and serving: which
tensors are matrices, each matrix's seed and context, decoding one section into its rebuilt
delta and rebuilding one tensor (a method's ``rebuild`` hook, else ``base + delta_hat``).
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel

from engine.compress.bits import SectionReader
from engine.compress.masks import derive_seed
from engine.compress.registry import CompressMethod, TensorContext
from engine.compress.scope import exact_delta, in_scope, scope_of
from engine.errors import ArtifactError
from engine.io.header import DTYPES


def is_matrix(shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2 and shape[0] > 0 and int(np.prod(shape)) > 0


def as_matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    return (shape[0], int(np.prod(shape[1:])))


def method_seed(method: CompressMethod, params: BaseModel) -> int:
    inner = params.inner_parsed() if hasattr(params, "inner_parsed") else params
    return int(getattr(inner, "seed", 0) or 0)


def stored_dtype(manifest: dict, name: str) -> torch.dtype:
    layout = manifest["layout"]
    dtype_name = (layout.get("dtype_overrides") or {}).get(name, layout.get("dtype", "F32"))
    if dtype_name not in DTYPES:
        raise ArtifactError(f"unknown dtype {dtype_name!r} in the manifest")
    return DTYPES[dtype_name][0]


def tensor_context(method: CompressMethod, params, name: str, index: int, device) -> TensorContext:
    return TensorContext(name=name, seed=derive_seed(method_seed(method, params), name),
                         device=device, index=index)


def decode_section(method: CompressMethod, params, data: bytes, name: str, shape, index: int,
                   device) -> torch.Tensor:
    """A matrix's rebuilt delta (float32, on ``device``, original shape)."""
    if not data:
        return torch.zeros(shape, dtype=torch.float32, device=device)
    if not in_scope(name, tuple(shape), scope_of(params)):  # kept: its delta in fp16
        return exact_delta(data, shape, name, device)
    reader = SectionReader(data, f"section of {name!r}")
    ctx = tensor_context(method, params, name, index, device)
    try:
        out = method.module.decode(reader, as_matrix_shape(shape), params, ctx)
    except (ValueError, IndexError, RuntimeError) as err:
        raise ArtifactError(f"section of {name!r} is corrupt: {err}") from None
    return out.reshape(shape)


def rebuild_tensor(method: CompressMethod, params, base_t: torch.Tensor, delta_hat: torch.Tensor,
                   name: str, index: int, device) -> torch.Tensor:
    # float32 at least; a float64 base stays float64 (float32 would round the base's values)
    base32 = base_t.to(device=device, dtype=torch.promote_types(base_t.dtype, torch.float32))
    hook = getattr(method.module, "rebuild", None)
    if hook is None or not in_scope(name, tuple(base_t.shape), scope_of(params)):
        return base32 + delta_hat
    return hook(base32, delta_hat, params, tensor_context(method, params, name, index, device))
