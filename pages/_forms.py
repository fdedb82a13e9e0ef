"""Render a pydantic params class as Streamlit widgets, so a new method needs no page change.

Scalar fields only (the engine's params classes are scalar: per-layer gradients and filters
are resolved before parsing): bool -> checkbox, int / float -> number input (bounds from the
field's ge/le/gt/lt), Literal -> select box, str -> text input, ``X | None`` -> the widget of
X behind an "unset" check. The returned dict is keyed by each field's alias (``lambda`` for
``lambda_``), i.e. the recipe's own parameter names.
"""

from __future__ import annotations

import json
import math
import types
import typing
from typing import Any

import annotated_types
import streamlit as st
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from engine.errors import DeltaWorkbenchError
from engine.textparse import parse_json


def _bounds(field, annotation=float) -> tuple[float | None, float | None]:
    low = high = None
    for meta in field.metadata:
        if isinstance(meta, annotated_types.Ge):
            low = meta.ge
        elif isinstance(meta, annotated_types.Gt):
            # widgets have closed ranges: the smallest value above (a learning rate of 1e-6
            # must stay reachable, so no fixed step here)
            low = meta.gt + 1 if annotation is int else math.nextafter(meta.gt, math.inf)
        elif isinstance(meta, annotated_types.Le):
            high = meta.le
        elif isinstance(meta, annotated_types.Lt):
            high = meta.lt
    return low, high


def _unwrap_optional(annotation) -> tuple[Any, bool]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return args[0], True
    return annotation, False


def field_widget(label: str, annotation, default: Any, field, key: str) -> Any:
    help_text = field.description or None
    origin = typing.get_origin(annotation)
    if annotation is bool:
        return st.checkbox(label, value=bool(default), key=key, help=help_text)
    if origin is typing.Literal:
        choices = list(typing.get_args(annotation))
        index = choices.index(default) if default in choices else 0
        return st.selectbox(label, choices, index=index, key=key, help=help_text)
    if origin in (tuple, list, dict) or annotation in (tuple, list, dict):
        # containers (ImPart's qt_counts, DBMS's inner_params ...): JSON in a text box
        text = st.text_input(f"{label} (JSON)", value="" if default is None else json.dumps(default),
                             key=key, help=help_text)
        if not text.strip():
            return None
        try:  # bounded: a deeply nested value must not end the page in a RecursionError
            return parse_json(text, source=label)
        except DeltaWorkbenchError:
            return text  # the method's validation then names the field
    low, high = _bounds(field, annotation)
    if annotation is int:
        return int(st.number_input(label, value=int(default if default is not None else low or 0),
                                   min_value=None if low is None else int(low),
                                   max_value=None if high is None else int(high),
                                   step=1, key=key, help=help_text))
    if annotation is float:
        value = float(default if default is not None else (low or 0.0))
        if low is not None and high is not None and 0.0 <= low and high <= 1.0:
            return st.slider(label, float(low), float(high), value, step=0.01, key=key,
                             help=help_text)
        small = 0 < abs(value) < 1e-2  # learning rates, ridges: steps and digits to match
        step = 10.0 ** math.floor(math.log10(abs(value))) if small else 0.05
        return float(st.number_input(label, value=value,
                                     min_value=None if low is None else float(low),
                                     max_value=None if high is None else float(high),
                                     step=step, format="%.2e" if small else "%.4f", key=key,
                                     help=help_text))
    return st.text_input(label, value="" if default is None else str(default), key=key,
                         help=help_text)


def params_form(params_class: type[BaseModel], key: str, *, defaults: dict | None = None,
                skip: tuple[str, ...] = ()) -> dict:
    """Widgets for every field of ``params_class``; returns ``{alias: value}`` of set fields."""
    defaults = defaults or {}
    values: dict[str, Any] = {}
    for name, field in params_class.model_fields.items():
        alias = field.alias or name
        if name in skip or alias in skip:
            continue
        annotation, optional = _unwrap_optional(field.annotation)
        default = defaults.get(alias, defaults.get(name, field.default))
        if default is PydanticUndefined:
            default = None
        widget_key = f"{key}.{name}"
        if optional:
            use = st.checkbox(f"set {alias}", value=default is not None, key=widget_key + ".set",
                              help=field.description or None)
            if not use:
                continue
        values[alias] = field_widget(alias, annotation, default, field, widget_key)
    return values


def float_fields(params_class: type[BaseModel]) -> list[tuple[str, float | None, float | None, float | None]]:
    """``(alias, low, high, default)`` of every float parameter (for sweeps); bounds as the
    widgets use them, None where open."""
    out = []
    for name, field in params_class.model_fields.items():
        annotation, _ = _unwrap_optional(field.annotation)
        if annotation is not float:
            continue
        low, high = _bounds(field, float)
        default = field.default if isinstance(field.default, (int, float)) else None
        out.append((field.alias or name, low, high, default))
    return out

