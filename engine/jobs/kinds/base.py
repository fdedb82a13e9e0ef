"""The job-kind registry: a kind is a name, a params class, a function and a description."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict

from engine.errors import ParameterError

Progress = Callable[[float, str], None]


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")



@dataclass(frozen=True)
class JobKind:
    name: str
    params_class: type[BaseModel]
    run: Callable[[Any, Progress], dict]
    description: str
    may_use_gpu: bool = True


JOB_KINDS: dict[str, JobKind] = {}


def register_kind(kind: JobKind) -> None:
    JOB_KINDS[kind.name] = kind


def get_kind(name: str) -> JobKind:
    try:
        return JOB_KINDS[name]
    except KeyError:
        known = ", ".join(sorted(JOB_KINDS))
        raise ParameterError(f"unknown job kind {name!r} (known: {known})") from None
