"""The ``visionfuse`` job kind: visionFuse: fusing multimodal members of one LM family."""

from __future__ import annotations

from pydantic import model_validator

from engine.errors import ParameterError
from engine.jobs.kinds.base import JobKind, Progress, _Params, register_kind


class VisionFuseJobParams(_Params):
    """A VisionFuse fusion (``engine.visionfuse.fuse``): every path under the allowed roots."""

    base: str
    models: list[str]
    out: str
    method: str = "task_arithmetic"
    params: dict = {}
    weights: list[float] | None = None

    @model_validator(mode="after")
    def _check(self) -> "VisionFuseJobParams":
        from engine import settings
        from engine.merge.registry import get_method
        from engine.paths import resolve_user_path

        roots = settings.allowed_roots()
        for path in (self.base, *self.models):
            resolve_user_path(path, roots, kind="dir")
        if len(self.models) < 2:
            raise ParameterError("VisionFuse fuses at least two members")
        if self.weights is not None and len(self.weights) != len(self.models):
            raise ParameterError(f"{len(self.weights)} weights for {len(self.models)} members")
        get_method(self.method).parse_params(self.params)
        return self


def _visionfuse(params: VisionFuseJobParams, progress: Progress) -> dict:
    from engine.visionfuse import fuse

    progress(0.0, "fusing")
    summary = fuse(params.base, params.models, params.out, params.method,
                   params.params or None, params.weights)
    progress(1.0, "fused")
    return summary


register_kind(JobKind("visionfuse", VisionFuseJobParams, _visionfuse,
                      "fuse multimodal members of one LM family (VisionFuse)"))
