"""The ``zoo_build`` job kind: training the demo zoo."""

from __future__ import annotations

from engine.jobs.kinds.base import JobKind, Progress, _Params, register_kind


class ZooBuildJobParams(_Params):
    out: str
    quick: bool = False
    seed: int = 0
    resume: bool = False  # continue the unfinished build in ``out``



def _zoo_build(params: ZooBuildJobParams, progress: Progress) -> dict:
    from engine.zoo import build_zoo

    out = build_zoo(params.out, quick=params.quick, seed=params.seed, progress=progress,
                    resume=params.resume)
    return {"out": str(out)}


register_kind(JobKind("zoo_build", ZooBuildJobParams, _zoo_build, "train the demo zoo",
                      may_use_gpu=False))
