"""The table of merge methods and a uniform way to call them.

Every module in METHOD_MODULES is one method: it defines NAME, PAPER, Params, ModelParams,
REQUIRES_BASE and merge_tensor(base, tensors, model_params, params, *, name="", generator=None
[, stats=None]); optionally validate(params, model_params), STATS ("fisher" / "gram": the method
takes stats=[...]), RANDOMIZED, MAX_MODELS (how many fine-tunes it merges at most: slerp's one)
DEFAULT_WEIGHT ("one", or "share": 1/n each, as a linear average starts) and OPTIONAL_BASE
(a method that works with or without a base: a base_model listed among the models is the base);
and optionally a model-wide first pass: model_statistic(base, tensors, model_params, params, *,
name="") gives one tensor's part of a statistic that the caller sums over every tensor of the
model (``MergeSpec.first_pass``, before any tensor is merged) and hands to merge_tensor as
``model_stat=``; uses_model_statistic(params) says whether these parameters need it (EMR's
model-wide rescalers do, its per-tensor ones do not). A module in FAMILY_MODULES instead declares VARIANTS, several
methods over one implementation (``engine.merge.gta.Variant``), listed in its place. Pages render
forms from the parameter classes (pydantic JSON schema), so a new method needs no page change:
add a module and one line here, or a family variant and no line here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from pydantic import BaseModel

from engine.errors import ParameterError
from engine.merge.gta import Variant
from engine.registry import MethodTable, load_method_module, validate_params

PACKAGE = "engine.merge.methods"
METHOD_MODULES: tuple[str, ...] = (
    "linear",
    "task_arithmetic_family",
    "slerp",
    "model_stock",
    "nuslerp", "multislerp", "karcher", "sce", "arcee_fusion", "nearswap", "ram", "ramplus_tl",
    "passthrough",
    "consensus",
    "tsv",
    "emr",
    "fisher",
    "regmean",
    "channel_merging",
    "sotu",
)

FAMILY_MODULES = frozenset({"task_arithmetic_family"})

_REQUIRED = ("NAME", "PAPER", "Params", "ModelParams", "REQUIRES_BASE", "merge_tensor")


@dataclass(frozen=True)
class MergeMethod:
    name: str
    paper: str
    params_class: type[BaseModel]
    model_params_class: type[BaseModel]
    requires_base: bool
    stats: str | None
    randomized: bool
    module: ModuleType | Variant  # what validate / merge_tensor are called on
    max_models: int | None = None  # fine-tunes it takes at most (None: any number)
    optional_base: bool = False  # uses a base when given (a base listed among models is the base)
    default_weight: str = "one"  # a form's starting per-model weight: "one" or "share" (1/n)
    model_stat: bool = False  # takes a model-wide first-pass statistic (see the module doc)

    def starting_weight(self, n_models: int) -> float:
        """The per-model weight a form starts from when ``n_models`` fine-tunes are merged."""
        return 1.0 / max(1, n_models) if self.default_weight == "share" else 1.0

    def parse_params(self, raw: Mapping[str, Any] | BaseModel | None = None) -> BaseModel:
        """Validated global parameters (mergekit names, e.g. 'lambda'); errors become ParameterError."""
        return validate_params(self.params_class, raw, f"{self.name} parameters")

    def parse_model_params(self, raws: Sequence[Mapping[str, Any] | BaseModel | None]) -> list[BaseModel]:
        return [validate_params(self.model_params_class, raw, f"{self.name} model {i} parameters")
                for i, raw in enumerate(raws)]

    def validate(self, params: BaseModel, model_params: Sequence[BaseModel]) -> None:
        """Cross-checks needing both global and per-model values (e.g. weights summing to 0 with normalize)."""
        check = getattr(self.module, "validate", None)
        if check is not None:
            check(params, model_params)

    def merge(
        self,
        base: torch.Tensor | None,
        tensors: Sequence[torch.Tensor],
        model_params: Sequence[Mapping[str, Any] | BaseModel | None],
        params: Mapping[str, Any] | BaseModel | None = None,
        *,
        name: str = "",
        generator: torch.Generator | None = None,
        stats: Sequence[torch.Tensor] | None = None,
        model_stat: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Validate raw or parsed parameters and merge one tensor; float32 result.

        ``model_stat``: the model-wide first-pass statistic (methods with ``model_stat``); a
        method called on one tensor without it treats that tensor as the whole model."""
        p = self.parse_params(params)
        mps = self.parse_model_params(model_params)
        kwargs: dict[str, Any] = {"name": name, "generator": generator}
        if self.stats is not None:
            kwargs["stats"] = stats
        elif stats is not None:
            raise ParameterError(f"{self.name} takes no calibration statistics", tensor=name or None)
        if self.model_stat:
            kwargs["model_stat"] = model_stat
        elif model_stat is not None:
            raise ParameterError(f"{self.name} takes no model-wide statistic", tensor=name or None)
        return self.module.merge_tensor(base, list(tensors), mps, p, **kwargs)

    def uses_model_statistic(self, params: BaseModel) -> bool:
        """Whether these (one tensor's) parameters need the model-wide first pass."""
        if not self.model_stat:
            return False
        wants = getattr(self.module, "uses_model_statistic", None)
        return True if wants is None else bool(wants(params))

    def model_statistic(self, base: torch.Tensor | None, tensors: Sequence[torch.Tensor],
                        model_params: Sequence[Mapping[str, Any] | BaseModel | None],
                        params: Mapping[str, Any] | BaseModel | None = None, *,
                        name: str = "") -> torch.Tensor:
        """One tensor's part of the model-wide statistic (float64; summed over tensors)."""
        if not self.model_stat:
            raise ParameterError(f"{self.name} takes no model-wide statistic", tensor=name or None)
        return self.module.model_statistic(base, list(tensors), self.parse_model_params(model_params),
                                           self.parse_params(params), name=name)

    def describe(self) -> dict[str, Any]:
        """What a page needs to render the method: names, paper, and JSON schemas of both classes."""
        return {
            "name": self.name,
            "paper": self.paper,
            "requires_base": self.requires_base,
            "stats": self.stats,
            "randomized": self.randomized,
            "max_models": self.max_models,
            "default_weight": self.default_weight,
            "model_stat": self.model_stat,
            "params_schema": self.params_class.model_json_schema(by_alias=True),
            "model_params_schema": self.model_params_class.model_json_schema(by_alias=True),
        }


def _load(module_name: str) -> MergeMethod:
    module = load_method_module(PACKAGE, module_name, _REQUIRED, "merge")
    return MergeMethod(
        name=module.NAME,
        paper=module.PAPER,
        params_class=module.Params,
        model_params_class=module.ModelParams,
        requires_base=bool(module.REQUIRES_BASE),
        stats=getattr(module, "STATS", None),
        randomized=bool(getattr(module, "RANDOMIZED", False)),
        module=module,
        max_models=getattr(module, "MAX_MODELS", None),
        optional_base=bool(getattr(module, "OPTIONAL_BASE", False)),
        default_weight=getattr(module, "DEFAULT_WEIGHT", "one"),
        model_stat=hasattr(module, "model_statistic"),
    )


def from_variant(variant: Variant) -> MergeMethod:
    """The method a family declaration describes."""
    return MergeMethod(
        name=variant.name,
        paper=variant.paper,
        params_class=variant.params_class,
        model_params_class=variant.model_params_class,
        requires_base=True,
        stats=None,
        randomized=variant.randomized,
        module=variant,
    )


def build_table() -> MethodTable[MergeMethod]:
    """Every method in METHOD_MODULES order, a family's variants in its place; one-file methods
    are imported on first use, a family's declarations now (they are data)."""
    names: list[str] = []
    variants: dict[str, Variant] = {}
    for module_name in METHOD_MODULES:
        if module_name not in FAMILY_MODULES:
            names.append(module_name)
            continue
        for variant in importlib.import_module(f"{PACKAGE}.{module_name}").VARIANTS:
            if variant.name in variants or variant.name in METHOD_MODULES:
                raise TypeError(f"merge method {variant.name} is declared twice")
            variants[variant.name] = variant
            names.append(variant.name)

    def load(name: str) -> MergeMethod:
        return from_variant(variants[name]) if name in variants else _load(name)

    return MethodTable(names, load, "merge")


_TABLE = build_table()


# The method a form starts on: TIES (trim, elect sign, disjoint mean), mergekit's most used.
DEFAULT_METHOD = "ties"


def list_methods() -> list[str]:
    return list(_TABLE.names)


def default_method() -> str:
    """The method a page's method choice starts on."""
    return DEFAULT_METHOD if DEFAULT_METHOD in _TABLE.names else _TABLE.names[0]


def get_method(name: str) -> MergeMethod:
    return _TABLE.get(name)
