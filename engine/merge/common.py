"""Pieces every merge method shares: parameter base classes, input checks, seeded randomness.

A method works on one tensor at a time. Inputs arrive in any float dtype; they are checked
(count, shape, finiteness) and converted once here to the work dtype: float32, or float64 when
an input is float64 (float32 would round its values). The result is checked for NaN/Inf before
it is handed back. The caller casts to the output dtype (and checks that cast).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from engine.errors import IncompatibleModelsError, NonFiniteError, ParameterError

WORK_DTYPE = torch.float32


class MethodParams(BaseModel):
    """Global parameters of a method. Unknown keys and NaN/Inf values are rejected."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)


class NoModelParams(MethodParams):
    """Per-model parameters of a method that has none."""


class RequiredWeight(MethodParams):
    """mergekit's per-model `weight`: required, any finite value (negative subtracts)."""

    weight: float = Field(..., description="Contribution of this model (mergekit `weight`).")


class DefaultWeight(MethodParams):
    """Per-model `weight` for methods mergekit lacks; defaults to 1."""

    weight: float = Field(1.0, description="Contribution of this model.")


def density_field(default: float = 1.0) -> float:
    return Field(
        default,
        gt=0.0,
        le=1.0,
        description="Fraction of the task vector's entries kept (mergekit `density`; 1 keeps all).",
    )


def seed_field() -> int | None:
    return Field(
        None,
        ge=0,
        description="Seed of this model's random mask; with a seed the draw is independent of "
        "the model's position and reproducible per tensor.",
    )


def prepare_inputs(
    method: str,
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    model_params: Sequence[object],
    *,
    name: str,
    requires_base: bool,
    min_models: int = 1,
    max_models: int | None = None,
) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """Check counts, shapes and finiteness; return tensors of the work dtype (``work_dtype``) on
    the first tensor's device (the caller's own tensor when it already is that dtype there:
    methods never write in place)."""
    n = len(tensors)
    if n < min_models:
        raise ParameterError(f"{method} needs at least {min_models} fine-tuned tensor(s), got {n}", tensor=name or None)
    if max_models is not None and n > max_models:
        raise ParameterError(f"{method} takes at most {max_models} fine-tuned tensor(s), got {n}", tensor=name or None)
    if len(model_params) != n:
        raise ParameterError(
            f"{method}: {len(model_params)} per-model parameter sets for {n} tensors", tensor=name or None
        )
    if requires_base and base is None:
        raise ParameterError(f"{method} needs a base model", tensor=name or None)
    device = tensors[0].device
    shape = tuple(tensors[0].shape)
    reasons = [f"input {i} has shape {tuple(t.shape)}, input 0 has {shape}" for i, t in enumerate(tensors) if tuple(t.shape) != shape]
    if base is not None and tuple(base.shape) != shape:
        reasons.append(f"base has shape {tuple(base.shape)}, input 0 has {shape}")
    if reasons:
        raise IncompatibleModelsError(f"{method}: shapes differ", reasons=reasons, tensor=name or None)
    dtype = work_dtype([*tensors, *([base] if base is not None else [])])
    out = []
    for i, t in enumerate(tensors):
        out.append(_finite_work(t, device, dtype, f"input {i}", name))
    base32 = _finite_work(base, device, dtype, "base", name) if base is not None else None
    return base32, out


def prepare_stats(
    method: str,
    stats: Sequence[torch.Tensor] | None,
    count: int,
    shape: tuple[int, ...],
    device: torch.device,
    *,
    name: str,
    what: str,
    dtype: torch.dtype = WORK_DTYPE,
) -> list[torch.Tensor]:
    """Per-model statistics (Fisher, Gram): one per model, of `shape`, finite, as `dtype` (the
    inputs' work dtype: float64 statistics against float32 weights cannot be multiplied)."""
    if stats is None or len(stats) != count:
        got = "none" if stats is None else str(len(stats))
        raise ParameterError(f"{method} needs one {what} per model ({count}), got {got}", tensor=name or None)
    bad = [f"{what} {i} has shape {tuple(s.shape)}, expected {shape}" for i, s in enumerate(stats) if tuple(s.shape) != shape]
    if bad:
        raise ParameterError(f"{method}: " + "; ".join(bad), tensor=name or None)
    return [_finite_work(s, device, dtype, f"{what} {i}", name) for i, s in enumerate(stats)]


def count_nonfinite(t: torch.Tensor) -> int:
    """Number of NaN/Inf entries. Fast path: a NaN or Inf anywhere makes the sum non-finite, and
    a sum is one cheap pass; only a non-finite sum (or a huge finite one overflowing) is
    looked at entry by entry."""
    if t.numel() == 0 or bool(torch.isfinite(t.sum())):
        return 0
    return int((~torch.isfinite(t)).sum())


def work_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """float64 when any input is float64 (its values do not fit float32), else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else WORK_DTYPE


def _finite_work(t: torch.Tensor, device: torch.device, dtype: torch.dtype, label: str,
                 name: str) -> torch.Tensor:
    if not t.is_floating_point():
        raise ParameterError(f"{label} is {t.dtype}, not a floating-point tensor", tensor=name or None)
    t = t.to(device=device, dtype=dtype)
    bad = count_nonfinite(t)
    if bad:
        raise NonFiniteError(f"{label} has {bad} non-finite value(s); refusing to merge", tensor=name or None)
    return t


def finish(result: torch.Tensor, method: str, name: str) -> torch.Tensor:
    """Refuse to hand back NaN/Inf (a parameter combination the validators did not foresee)."""
    bad = count_nonfinite(result)
    if bad:
        raise NonFiniteError(f"{method} produced {bad} non-finite value(s)", tensor=name or None)
    return result


def weights_column(weights: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Weights shaped (N, 1, 1, ...) to broadcast against a stack of N tensors shaped like `like`
    (in its dtype: float32 weights would round a float64 merge's weights)."""
    w = torch.tensor(list(weights), dtype=like.dtype, device=like.device)
    return w.view(-1, *([1] * like.dim()))


def check_normalizable(method: str, weights: Sequence[float]) -> None:
    """Normalising by a weight sum of zero would divide by zero (mergekit silently uses 1)."""
    if abs(sum(weights)) < 1e-8:
        raise ParameterError(
            f"{method}: the weights sum to {sum(weights):g}; with normalize on that divides by zero. "
            "Change a weight or set normalize: false"
        )


# ---------------------------------------------------------------- seeded randomness
def derive_seed(seed: int, name: str) -> int:
    """A 63-bit seed from (seed, tensor name); stable across processes (unlike hash())."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator_for(index: int, seed: int | None, shared: torch.Generator | None, name: str) -> torch.Generator:
    """The generator that draws model `index`'s mask for tensor `name`.

    A per-model seed wins (its mask then follows the model when inputs are reordered); else the
    caller's shared generator (draws in model order); else one seeded from the model's position,
    so a merge with no seeds at all is still reproducible.
    """
    if seed is not None:
        return torch.Generator().manual_seed(derive_seed(seed, name))
    if shared is not None:
        return shared
    return torch.Generator().manual_seed(derive_seed(index, name))


def uniform_like(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Uniform [0, 1) draws shaped like t. Drawn on the generator's device (CPU by default)
    then moved, so a seed gives the same mask on CPU and GPU."""
    u = torch.rand(t.shape, generator=generator, dtype=WORK_DTYPE, device=generator.device)
    return u.to(t.device)


# ---------------------------------------------------------------- bit-packed masks
_BIT_VALUES = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Flattened bool mask -> uint8, 8 entries a byte, first entry in the high bit (numpy.packbits order)."""
    flat = mask.reshape(-1).to(torch.uint8).cpu()
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, torch.zeros(pad, dtype=torch.uint8)])
    return (flat.view(-1, 8) * _BIT_VALUES).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of pack_bits: the bool mask of `shape`."""
    numel = 1
    for s in shape:
        numel *= int(s)
    if packed.dtype != torch.uint8 or packed.numel() != (numel + 7) // 8:
        raise ParameterError(f"packed mask has {packed.numel()} {packed.dtype} bytes; shape {tuple(shape)} needs {(numel + 7) // 8} uint8")
    bits = (packed.reshape(-1, 1).cpu() & _BIT_VALUES) != 0
    return bits.reshape(-1)[:numel].reshape(tuple(shape))
