"""Resolve mergekit-style parameter settings to one value per tensor.

A setting is (mergekit/config.py, evaluate_setting):
  - a scalar (number, bool, string): used as is;
  - a gradient, a list of numbers: interpolated piecewise-linearly at the layer fraction t,
    anchors evenly spaced over [0, 1]: x = t (n - 1), i = floor(x), value
    (1 - (x - i)) v[i] + (x - i) v[min(i + 1, n - 1)];
    a list of non-numbers (bools, strings) picks v[int(t (n - 1))];
  - a condition {filter: ..., value: ...} or a list of them: the first whose filter is empty,
    "*", or a substring of the tensor name gives the value (itself a scalar or gradient);
    when none matches the setting is absent (the caller falls back to the next scope / default).
The layer fraction t (mergekit/plan.py): layer i of L gets i / (L - 1), a single layer gets 1,
and tensors outside the layer stack (embeddings, final norm, lm_head) get 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from engine.errors import ParameterError

def layer_fraction(layer_index: int | None, num_layers: int | None) -> float:
    """mergekit's t: 0 outside the layer stack, 1 for a one-layer stack, else i / (L - 1)."""
    if layer_index is None:
        return 0.0
    if num_layers is None or num_layers < 1:
        raise ParameterError(f"layer {layer_index} given without a positive number of layers")
    if not 0 <= layer_index < num_layers:
        raise ParameterError(f"layer index {layer_index} outside 0..{num_layers - 1}")
    return 1.0 if num_layers == 1 else layer_index / (num_layers - 1)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_scalar(x: Any) -> bool:
    return isinstance(x, (int, float, bool, str))


def _is_condition(x: Any) -> bool:
    return isinstance(x, Mapping) or (hasattr(x, "value") and hasattr(x, "filter"))


def _condition_parts(cond: Any) -> tuple[str | None, Any]:
    if isinstance(cond, Mapping):
        unknown = set(cond) - {"filter", "value"}
        if unknown or "value" not in cond:
            raise ParameterError(f"a conditional setting needs 'value' (and optionally 'filter'), got keys {sorted(cond)}")
        return cond.get("filter"), cond["value"]
    return cond.filter, cond.value


def interpolate_gradient(values: list, t: float) -> Any:
    if not values:
        raise ParameterError("a gradient needs at least one value")
    n = len(values)
    if all(_is_number(v) for v in values):
        for v in values:
            if not math.isfinite(v):
                raise ParameterError(f"gradient value {v} is not finite")
        x = t * (n - 1)
        i = int(x)
        frac = x - i
        j = min(n - 1, i + 1)
        return (1 - frac) * values[i] + frac * values[j]
    # mergekit would interpolate bools as numbers; picking one is what a bool gradient means
    if all(_is_scalar(v) for v in values):
        return values[int(t * (n - 1))]
    raise ParameterError(f"a gradient holds numbers (or all scalars), got {values!r}")


def resolve(
    value: Any,
    tensor_name: str,
    layer_index: int | None = None,
    num_layers: int | None = None,
    default: Any = None,
) -> Any:
    """The value a setting takes for one tensor (see module docstring); `default` if no filter matches."""
    t = layer_fraction(layer_index, num_layers)
    return _resolve_at(value, tensor_name, t, default)


def _resolve_at(value: Any, tensor_name: str, t: float, default: Any) -> Any:
    if value is None:
        return default
    if _is_scalar(value):
        return value
    if _is_condition(value):
        value = [value]
    if isinstance(value, (list, tuple)):
        items = list(value)
        if items and all(_is_condition(c) for c in items):
            for cond in items:
                filt, inner = _condition_parts(cond)
                if filt is None or filt == "*" or (tensor_name and filt in tensor_name):
                    if _is_condition(inner) or (isinstance(inner, (list, tuple)) and inner and _is_condition(inner[0])):
                        raise ParameterError("a condition's value must be a scalar or a gradient, not another condition")
                    return _resolve_at(inner, tensor_name, t, default)
            return default
        if any(_is_condition(c) for c in items):
            raise ParameterError(f"a setting mixes conditions and plain values: {items!r}")
        return interpolate_gradient(items, t)
    raise ParameterError(f"unexpected setting {value!r} (expected a scalar, a gradient list or filter conditions)")


def resolve_all(
    settings: Mapping[str, Any] | None,
    tensor_name: str,
    layer_index: int | None = None,
    num_layers: int | None = None,
) -> dict[str, Any]:
    """Resolve every setting of a parameter mapping; settings no filter matches are left out
    (so the method's default, or an outer scope, applies)."""
    out: dict[str, Any] = {}
    for key, setting in (settings or {}).items():
        value = resolve(setting, tensor_name, layer_index, num_layers, default=_MISSING)
        if value is not _MISSING:
            out[key] = value
    return out


_MISSING = object()
