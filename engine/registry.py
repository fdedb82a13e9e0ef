"""What the merge and compression registries share: loading a method module (checked for the
attributes its kind needs, its NAME equal to its file), the cached name -> method table with a
named error for unknown names, and one wording of parameter validation errors."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Generic, TypeVar

from pydantic import ValidationError

from engine.errors import ParameterError

M = TypeVar("M")


def format_validation_error(prefix: str, err: ValidationError) -> str:
    """``prefix: field: message; other.field: message`` (one line for the CLI and the pages)."""
    parts = []
    for e in err.errors():
        where = ".".join(str(x) for x in e["loc"]) or "parameters"
        parts.append(f"{where}: {e['msg']}")
    return f"{prefix}: " + "; ".join(parts)


def validate_params(params_class, raw, label: str):
    """``raw`` (a mapping, None, or already an instance) as ``params_class``; a pydantic error
    becomes one ParameterError line prefixed with ``label`` (e.g. "ties parameters")."""
    if isinstance(raw, params_class):
        return raw
    try:
        return params_class.model_validate(dict(raw or {}))
    except ValidationError as err:
        raise ParameterError(format_validation_error(label, err)) from None


def load_method_module(package: str, name: str, required: Sequence[str], kind: str) -> ModuleType:
    """``package.name``, refused (TypeError, a programming error) when it lacks one of
    ``required`` or declares another NAME."""
    module = importlib.import_module(f"{package}.{name}")
    missing = [a for a in required if not hasattr(module, a)]
    if missing:
        raise TypeError(f"{kind} method module {name} lacks {', '.join(missing)}")
    if module.NAME != name:
        raise TypeError(f"{kind} method module {name} declares NAME {module.NAME!r}")
    return module


class MethodTable(Generic[M]):
    """Methods by name, each built on first use by ``load(name)``."""

    def __init__(self, names: Sequence[str], load: Callable[[str], M], kind: str):
        self.names, self.kind = tuple(names), kind
        self._load = load
        self._methods: dict[str, M] = {}

    def get(self, name: str) -> M:
        if name not in self.names:
            raise ParameterError(f"unknown {self.kind} method {name!r}; known: {', '.join(self.names)}")
        if name not in self._methods:
            self._methods[name] = self._load(name)
        return self._methods[name]
