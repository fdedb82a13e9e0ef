"""The table of safety-repair methods and a uniform way to call them.

Every module in METHOD_MODULES (``engine/repair/<name>.py``) defines ``NAME``, ``PAPER``,
``Params`` (a pydantic class the pages render as a form), ``STATS`` (what it needs besides the
two models' tensors: ``safety_hessian``, ``task_hessian``, ``fisher``, ``safety_vector``),
``target_names(params, layout) -> set`` (the linear weights it repairs with those statistics)
and ``repair_tensor(inputs, params) -> (tensor, report or None)``, a pure function of one
tensor's ``TensorInputs`` (every tensor of the model passes through it, targets or not: a
method says what happens to embeddings, head and norms). Ablations are parameters
(``safe_delta`` with ``compensate: false``, ``irr`` with ``recalibrate: false``), not methods.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
from pydantic import BaseModel

from engine.registry import MethodTable, load_method_module, validate_params

METHOD_MODULES: tuple[str, ...] = ("safe_delta", "irr", "resta", "random_mask", "delta_scale")
_REQUIRED = ("NAME", "PAPER", "Params", "STATS", "target_names", "repair_tensor")
KNOWN_STATS = frozenset({"safety_hessian", "task_hessian", "fisher", "safety_vector"})
# The knob a trade-off curve sweeps, per method (the page's and the bench's x axis).
KNOBS = {"safe_delta": "s", "irr": "keep_conflicting", "resta": "beta",
         "random_mask": "keep_share", "delta_scale": "alpha"}


@dataclass
class RepairLayout:
    """The model's linear weights by role (state-dict names, in execution order)."""

    decoder_linears: list[str] = field(default_factory=list)  # inside the decoder layers
    other_linears: list[str] = field(default_factory=list)    # outside them (an untied head)


@dataclass
class TensorInputs:
    """What a method sees of one tensor (float32, on the compute device)."""

    name: str
    aligned: torch.Tensor
    finetuned: torch.Tensor
    target: bool = False                      # one of the method's target_names
    safety_vector: torch.Tensor | None = None
    safety_hessian: torch.Tensor | None = None
    task_hessian: torch.Tensor | None = None
    fisher: torch.Tensor | None = None
    share: float | None = None                # random_mask: the matched share of this matrix
    path: str | None = None                   # the fine-tune folder, for errors


@dataclass(frozen=True)
class RepairMethod:
    name: str
    paper: str
    params_class: type[BaseModel]
    stats: tuple[str, ...]
    module: ModuleType

    @property
    def knob(self) -> str:
        return KNOBS[self.name]

    def parse_params(self, raw: Mapping[str, Any] | BaseModel | None = None) -> BaseModel:
        return validate_params(self.params_class, raw, f"{self.name} parameters")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "paper": self.paper, "statistics": list(self.stats),
                "knob": self.knob, "params_schema": self.params_class.model_json_schema(by_alias=True)}


def _load(module_name: str) -> RepairMethod:
    module = load_method_module("engine.repair", module_name, _REQUIRED, "repair")
    unknown = set(module.STATS) - KNOWN_STATS
    if unknown:
        raise TypeError(f"repair method {module_name} asks for unknown statistics {sorted(unknown)}")
    return RepairMethod(name=module.NAME, paper=module.PAPER, params_class=module.Params,
                        stats=tuple(module.STATS), module=module)


_TABLE = MethodTable(METHOD_MODULES, _load, "repair")


def list_methods() -> list[str]:
    return list(METHOD_MODULES)


def get_method(name: str) -> RepairMethod:
    return _TABLE.get(name)


__all__ = ["KNOBS", "METHOD_MODULES", "RepairLayout", "RepairMethod", "TensorInputs",
           "get_method", "list_methods"]
