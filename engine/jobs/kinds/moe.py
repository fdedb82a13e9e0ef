"""The ``moe`` job kind: building a mixture of experts from dense fine-tunes."""

from __future__ import annotations

from pydantic import model_validator

from engine.jobs.kinds.base import JobKind, Progress, _Params, register_kind


class MoEJobParams(_Params):
    """A mixture of experts assembled per a mergekit-moe config (``engine.moe``)."""

    config_yaml: str  # mergekit-moe's config format
    out: str  # destination folder (must not exist)
    config_dir: str | None = None  # where relative model paths in the config resolve

    @model_validator(mode="after")
    def _check_config(self) -> "MoEJobParams":
        # parsed strictly and checked (gate mode, experts per token, prompts), and every model
        # folder it names inside the allowed roots, at submit (nothing queued) and in the worker
        from engine import settings
        from engine.moe import parse_moe_text
        from engine.recipe import resolve_model_ref

        config = parse_moe_text(self.config_yaml)
        roots = settings.allowed_roots()
        for key, ref in config.model_refs():
            resolve_model_ref(ref, key=key, recipe_dir=self.config_dir, allowed_roots=roots)
        return self


def _moe(params: MoEJobParams, progress: Progress) -> dict:
    from engine import settings
    from engine.moe import parse_moe_text, run_moe

    config = parse_moe_text(params.config_yaml)
    result = run_moe(config, params.out, config_dir=params.config_dir, progress=progress,
                     allowed_roots=settings.allowed_roots())
    return {"out": str(result.out), "tensors": result.tensors, "architecture": result.architecture,
            "experts": len(config.experts), "gate_mode": config.gate_mode,
            "seconds": round(result.seconds, 3), "device": result.device,
            "warnings": list(result.warnings)}


register_kind(JobKind("moe", MoEJobParams, _moe,
                      "assemble a mixture of experts from fine-tunes (mergekit-moe's config)"))
