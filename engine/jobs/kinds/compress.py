"""The ``compress`` job kinds: compressing a fine-tune's delta into an artifact, and decompressing one."""

from __future__ import annotations

from engine.jobs.kinds.base import JobKind, Progress, _Params, register_kind


class CompressJobParams(_Params):
    base: str
    finetuned: str
    method: str
    out: str
    ratio: float | None = None
    params: dict = {}


class DecompressJobParams(_Params):
    artifact: str
    base: str
    out: str


def _compress(params: CompressJobParams, progress: Progress) -> dict:
    from engine import settings
    from engine.compress import compress

    result = compress(params.base, params.finetuned, params.out, params.method,
                      ratio=params.ratio, params=params.params or None, progress=progress,
                      allowed_roots=settings.allowed_roots())
    return {"out": str(result.out), "method": result.method, "ratio": result.ratio,
            "scope": result.scope, "ratio_compressed": result.ratio_compressed,
            "bytes": result.bytes, "delta_entries": result.delta_entries,
            "seconds": round(result.seconds, 3), "warnings": list(result.warnings)}


def _decompress(params: DecompressJobParams, progress: Progress) -> dict:
    from engine.compress import decompress

    result = decompress(params.artifact, params.base, params.out, progress=progress)
    return {"out": str(result.out), "method": result.method, "tensors": result.tensors,
            "seconds": round(result.seconds, 3)}


register_kind(JobKind("compress", CompressJobParams, _compress,
                      "compress a fine-tune's delta into an artifact"))
register_kind(JobKind("decompress", DecompressJobParams, _decompress,
                      "rebuild a fine-tune from an artifact and its base"))
