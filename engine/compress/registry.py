"""The table of delta compressors and a uniform way to call them.

Every module in METHOD_MODULES (``engine/compress/methods/<name>.py``) defines:

- ``NAME``, ``PAPER`` and ``Params`` (a pydantic class the pages render as a form);
- ``SOLVED``: the Params fields a target ratio solves for (they must be left unset when a
  ratio is given, and set when it is not);
- ``encode(delta, budget, params, ctx) -> bytes``: one 2-D delta (float32, on ``ctx.device``)
  to a section of at most ``budget`` bytes (``None``: use the explicit parameters). An empty
  section means "zero delta";
- ``decode(reader, shape, params, ctx) -> Tensor``: the section back to a float32 delta.

Optional: ``RANDOMIZED`` (masks drawn from ``ctx.seed``); ``validate(params, ratio)``;
``prepass(delta, params, ctx)`` + ``allocate(stats, budgets, params)`` for compressors that
split the byte budget across tensors from a first streaming pass (``ctx.setting`` then holds
each tensor's share); ``calibrate(job, params)`` for compressors that learn a few scalars on
calibration prompts after encoding, with ``learns(params)`` saying whether it runs for these
parameters (the pipeline never reads a method's own parameters); ``rebuild(base, delta_hat, params, ctx)`` when the
fine-tune is not simply ``base + delta_hat``.

Every Params class inherits two pipeline options from ``CompressParams`` (so forms, the
``methods`` listing, recipes and ``--param`` see them for every method): ``scope`` (what is
compressed: every matrix, or only the transformer blocks' matrices, the rest stored exactly in
fp16) and ``ratio_over`` (what a target ratio is measured over). The encoder reads them; a
method never does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from engine.errors import ParameterError
from engine.registry import MethodTable, load_method_module, validate_params

METHOD_MODULES: tuple[str, ...] = (
    "magnitude",
    "dare",
    "svd",
    "bitdelta",
    "delta_come",
    "impart",
    "delta_dct",
    "dbms",
)

_REQUIRED = ("NAME", "PAPER", "Params", "SOLVED", "encode", "decode")


SCOPES = ("all", "blocks")
RATIO_OVER = ("artifact", "compressed")
PIPELINE_FIELDS = ("scope", "ratio_over")


class CompressParams(BaseModel):
    """Base of every compressor's parameters: unknown keys are refused. ``scope`` and
    ``ratio_over`` are the pipeline's (see ``engine.compress.encode``), not the method's."""

    model_config = ConfigDict(extra="forbid")

    scope: Literal["all", "blocks"] = Field(
        "all", description="What is compressed: 'all' = every matrix (embeddings and head "
                           "included); 'blocks' = only the transformer blocks' matrices, as the "
                           "papers do: embeddings, head, norms and biases are stored exactly "
                           "(their deltas in fp16) and still counted on disk.")
    ratio_over: Literal["artifact", "compressed"] = Field(
        "artifact", description="What the target ratio is measured over: 'artifact' = bytes on "
                                "disk of the whole artifact folder (our honest figure); "
                                "'compressed' = the compressed matrices' sections only (the "
                                "papers' convention; ours as an option). Both are reported.")


@dataclass
class TensorContext:
    """What a compressor knows about the tensor at hand besides its values."""

    name: str
    seed: int
    device: torch.device
    index: int = 0
    setting: Any = None  # this tensor's share from allocate(), when the method has one
    info: dict = field(default_factory=dict)  # what encode chose (for reports)


@dataclass(frozen=True)
class CompressMethod:
    name: str
    paper: str
    params_class: type[BaseModel]
    solved: tuple[str, ...]
    randomized: bool
    module: ModuleType

    def parse_params(self, raw: Mapping[str, Any] | BaseModel | None = None,
                     ratio: float | None = None) -> BaseModel:
        """Validated parameters; with a ratio the solved fields must be unset, without one set."""
        params = validate_params(self.params_class, raw, f"{self.name} parameters")
        given = [f for f in self.solved if getattr(params, f) is not None]
        if ratio is not None:
            if not ratio > 1.0:
                raise ParameterError(f"ratio must be > 1 (got {ratio})")
            if given:
                raise ParameterError(f"{self.name}: give either --ratio or {', '.join(given)}, not both "
                                     "(the ratio solves them)")
        elif self.solved and len(given) < len(self.solved):
            missing = [f for f in self.solved if f not in given]
            raise ParameterError(f"{self.name}: give --ratio or the parameter(s) {', '.join(missing)}")
        check = getattr(self.module, "validate", None)
        if check is not None:
            check(params, ratio)
        return params

    @property
    def presets(self) -> dict[str, dict[str, Any]]:
        """Named parameter sets the bench measured (``PRESETS`` of the method's module)."""
        return dict(getattr(self.module, "PRESETS", {}))

    def preset(self, name: str) -> dict[str, Any]:
        presets = self.presets
        if name not in presets:
            known = ", ".join(presets) or "none"
            raise ParameterError(f"{self.name}: unknown preset {name!r} (known: {known})")
        return dict(presets[name])

    @property
    def has_allocation(self) -> bool:
        return hasattr(self.module, "allocate")

    @property
    def calibrated(self) -> bool:
        return hasattr(self.module, "calibrate")

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "paper": self.paper,
            "randomized": self.randomized,
            "solved_by_ratio": list(self.solved),
            "presets": self.presets,
            "params_schema": self.params_class.model_json_schema(by_alias=True),
        }


def _load(module_name: str) -> CompressMethod:
    module = load_method_module("engine.compress.methods", module_name, _REQUIRED, "compress")
    return CompressMethod(name=module.NAME, paper=module.PAPER, params_class=module.Params,
                          solved=tuple(module.SOLVED), randomized=bool(getattr(module, "RANDOMIZED", False)),
                          module=module)


_TABLE = MethodTable(METHOD_MODULES, _load, "compression")


def list_methods() -> list[str]:
    return list(METHOD_MODULES)


def get_method(name: str) -> CompressMethod:
    return _TABLE.get(name)
