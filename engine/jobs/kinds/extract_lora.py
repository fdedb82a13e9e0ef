"""The ``extract_lora`` job kind: extracting a LoRA adapter from a full fine-tune's delta."""

from __future__ import annotations

from pydantic import model_validator

from engine.jobs.kinds.base import JobKind, Progress, _Params, register_kind


class ExtractLoraJobParams(_Params):
    """A PEFT LoRA adapter extracted from a fine-tune (``engine.lora.extract``)."""

    base: str
    finetuned: str
    out: str
    options: dict = {}  # engine.lora.extract.ExtractOptions as JSON

    @model_validator(mode="after")
    def _check(self) -> "ExtractLoraJobParams":
        # both folders under the allowed roots and the options valid, at submit (nothing queued)
        # and again in the worker
        from engine import settings
        from engine.lora.extract import ExtractOptions
        from engine.paths import resolve_user_path

        for path in (self.base, self.finetuned):
            resolve_user_path(path, settings.allowed_roots(), kind="dir")
        ExtractOptions.model_validate(self.options)
        return self


def _extract_lora(params: ExtractLoraJobParams, progress: Progress) -> dict:
    from engine.lora.extract import ExtractOptions, extract_lora

    result = extract_lora(params.base, params.finetuned, params.out,
                          ExtractOptions.model_validate(params.options), progress=progress)
    return {"out": str(result.out), "modules": result.modules,
            "ranks": sorted(set(result.ranks.values())), "kept_energy": round(result.kept_energy, 6),
            "seconds": round(result.seconds, 3), "warnings": list(result.warnings)}


register_kind(JobKind("extract_lora", ExtractLoraJobParams, _extract_lora,
                      "extract a PEFT LoRA adapter from a fine-tune"))
