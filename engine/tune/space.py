"""The search space of a tune recipe: a mergekit recipe whose numeric parameters are ranges.

Any numeric parameter value of a recipe may be written ``{range: [lo, hi]}`` (optionally
``log: true``, then ``lo > 0``) and is searched over that interval. It may stand where a
number stands:
  - a recipe's ``parameters`` (global), a slice's ``parameters`` (per slice), a model's or a
    slice source's ``parameters`` (per model);
  - an entry of a gradient list (per gradient point): ``weight: [0.2, {range: [0, 1]}]``;
  - the ``value`` of a filter condition: ``density: [{filter: mlp, value: {range: [0.1, 1]}}]``.

``layer_groups: G`` (a top-level key of the tune recipe, not mergekit's) expands every ranged
per-model parameter written as a scalar range into a gradient of G ranged points, one per group
of layers, as mergekit-evolve's ``smooth`` genome does (its per-group values become a gradient
interpolated over the layers; G equal to the number of layers gives each layer its own value).

Each searched value is a named dimension (``models[0].weight``, ``models[1].density[2]``,
``parameters.lambda``, ``slices[0].sources[1].t``); ``decode(values)`` gives back the plain
recipe (a mapping mergekit reads, no ranges left).
"""

from __future__ import annotations

import copy
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.errors import ParameterError

LAYER_GROUPS_KEY = "layer_groups"


@dataclass(frozen=True)
class Dimension:
    """One searched number: its name, interval, scale and where it sits in the recipe."""

    name: str
    lo: float
    hi: float
    log: bool
    path: tuple  # keys/indices from the recipe's root to the value


@dataclass
class TuneSpace:
    """The plain recipe skeleton (ranges still in place) and the dimensions searched."""

    raw: dict
    dimensions: list[Dimension] = field(default_factory=list)
    layer_groups: int = 1

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.dimensions]

    def decode(self, values: Mapping[str, float]) -> dict:
        """The plain recipe with each range replaced by ``values[name]`` (every name needed)."""
        missing = [d.name for d in self.dimensions if d.name not in values]
        if missing:
            raise ParameterError(f"no value for the searched parameter(s) {missing}")
        out = copy.deepcopy(self.raw)
        for dim in self.dimensions:
            _set(out, dim.path, float(values[dim.name]))
        return out

    def midpoint(self) -> dict[str, float]:
        """The centre of every interval (geometric for a log range)."""
        return {d.name: (math.sqrt(d.lo * d.hi) if d.log else (d.lo + d.hi) / 2)
                for d in self.dimensions}


def _set(root: Any, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        root = root[key]
    root[path[-1]] = value


def is_range(value: Any) -> bool:
    return isinstance(value, Mapping) and "range" in value


def _check_range(value: Mapping, where: str) -> tuple[float, float, bool]:
    extra = set(value) - {"range", "log"}
    if extra:
        raise ParameterError(f"tune recipe key {where}: a range takes 'range' and 'log' only, "
                             f"got {sorted(extra)}")
    bounds = value["range"]
    if (not isinstance(bounds, (list, tuple)) or len(bounds) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)):
        raise ParameterError(f"tune recipe key {where}: range must be [lo, hi] (two numbers), "
                             f"got {bounds!r}")
    lo, hi = float(bounds[0]), float(bounds[1])
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ParameterError(f"tune recipe key {where}: range bounds must be finite, got {bounds!r}")
    if lo >= hi:
        raise ParameterError(f"tune recipe key {where}: range [{lo:g}, {hi:g}] needs lo < hi")
    log = value.get("log", False)
    if not isinstance(log, bool):
        raise ParameterError(f"tune recipe key {where}: log must be true or false, got {log!r}")
    if log and lo <= 0:
        raise ParameterError(f"tune recipe key {where}: a log range needs lo > 0, got {lo:g}")
    return lo, hi, log


def _numeric_annotation(annotation: Any) -> bool:
    """Whether a pydantic field's type takes a number (float or int, not bool; Optional ok)."""
    if annotation in (float, int):
        return True
    args = typing.get_args(annotation)
    return bool(args) and any(a in (float, int) for a in args) and bool not in args


def numeric_parameters(method_name: str) -> tuple[set[str], set[str]]:
    """(global, per-model) parameter names of a method that take a number."""
    from engine.merge.registry import get_method

    method = get_method(method_name)

    def names(cls) -> set[str]:
        out = set()
        for key, info in cls.model_fields.items():
            if _numeric_annotation(info.annotation):
                out.add(key)
                if info.alias:
                    out.add(info.alias)
        return out

    return names(method.params_class), names(method.model_params_class)


def _walk(value: Any, path: tuple, name: str, where: str, found: list[Dimension]) -> None:
    """Collect the ranges in one parameter's setting (scalar, gradient, conditions)."""
    if is_range(value):
        lo, hi, log = _check_range(value, where)
        found.append(Dimension(name, lo, hi, log, path))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, Mapping) and "value" in item and not is_range(item):
                _walk(item["value"], path + (i, "value"), f"{name}[{i}]", f"{where}[{i}].value",
                      found)
            else:
                _walk(item, path + (i,), f"{name}[{i}]", f"{where}[{i}]", found)
    elif isinstance(value, Mapping) and "value" in value:
        _walk(value["value"], path + ("value",), name, f"{where}.value", found)


def parse_space(data: Any, *, source: str = "tune recipe", require: bool = True) -> TuneSpace:
    """The search space of a tune recipe (a parsed YAML mapping); see the module doc.
    ``require=False``: a recipe without any range is an empty space (not an error)."""
    from engine.errors import ConfigError

    if not isinstance(data, Mapping):
        raise ConfigError("a tune recipe is a YAML mapping", path=source)
    raw = copy.deepcopy(dict(data))
    groups = raw.pop(LAYER_GROUPS_KEY, 1)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ParameterError(f"tune recipe key {LAYER_GROUPS_KEY}: a positive integer, got {groups!r}")
    method = raw.get("merge_method")
    if not isinstance(method, str):
        raise ConfigError("the recipe needs a merge_method", path=source)
    global_numeric, model_numeric = numeric_parameters(method)
    numeric = global_numeric | model_numeric

    scopes: list[tuple[tuple, str, str, bool]] = []  # (path, dimension prefix, key prefix, per model)
    scopes.append((("parameters",), "parameters", "parameters", False))
    for i, _ in enumerate(raw.get("models") or []):
        scopes.append((("models", i, "parameters"), f"models[{i}]", f"models[{i}].parameters", True))
    for i, piece in enumerate(raw.get("slices") or []):
        scopes.append((("slices", i, "parameters"), f"slices[{i}]", f"slices[{i}].parameters", False))
        for j, _ in enumerate((piece or {}).get("sources") or []):
            scopes.append((("slices", i, "sources", j, "parameters"), f"slices[{i}].sources[{j}]",
                           f"slices[{i}].sources[{j}].parameters", True))
    found: list[Dimension] = []
    for path, prefix, keyname, per_model in scopes:
        try:
            params = _get(raw, path)
        except (KeyError, IndexError, TypeError):
            continue
        if not isinstance(params, dict):
            continue
        for key, value in list(params.items()):
            before = len(found)
            if per_model and groups > 1 and is_range(value):
                _check_range(value, f"{keyname}.{key}")
                value = [copy.deepcopy(value) for _ in range(groups)]
                params[key] = value
            _walk(value, path + (key,), f"{prefix}.{key}", f"{keyname}.{key}", found)
            if len(found) > before and key not in numeric:
                raise ParameterError(f"tune recipe key {keyname}.{key}: a range needs a numeric "
                                     f"parameter; {method} does not take {key!r} as a number")
    if not found and require:
        raise ParameterError("the tune recipe has no {range: [lo, hi]} to search", path=source)
    names = [d.name for d in found]
    if len(set(names)) != len(names):  # cannot happen with the paths above; guard all the same
        raise ParameterError("two searched parameters have the same name")
    return TuneSpace(raw=raw, dimensions=found, layer_groups=groups)


def _get(root: Any, path: tuple) -> Any:
    for key in path:
        root = root[key]
    return root


__all__ = ["Dimension", "LAYER_GROUPS_KEY", "TuneSpace", "is_range", "numeric_parameters",
           "parse_space"]
