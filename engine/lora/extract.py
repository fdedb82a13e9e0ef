"""Extract a PEFT LoRA adapter from a full fine-tune: each linear layer's task vector truncated
to its best rank-r approximation (Eckart-Young: the top r singular triplets).

For ``delta = U S V^T`` (float32, out x in) we keep the first ``r`` triplets and split the
singular values evenly, ``B = U_r sqrt(S_r)`` (out x r) and ``A = sqrt(S_r) V_r^T`` (r x in),
so neither factor carries all the scale (kinder to fp16/bf16 storage). The adapter's
``lora_alpha`` equals its rank module by module, so PEFT's scale ``alpha / r`` is 1 and
``base + B @ A`` is the rank-r approximation itself. Options follow mergekit-extract-lora's:

- ``rank``: the most singular triplets kept per module (mergekit's ``--max-rank``).
- ``sv_cutoff``: also drop triplets with ``s_i < sv_cutoff * s_1`` (a relative singular-value
  cut-off; each module's own rank then goes to ``rank_pattern`` / ``alpha_pattern``).
- ``embed_lora``: input embeddings get an embedding LoRA too (off by default, as in mergekit);
  the output head is a linear layer and follows the same switch.
- ``save_modules``: modules stored whole (PEFT ``modules_to_save``), e.g. ``lm_head``.

Whatever changed and the adapter cannot carry (norms, biases, embeddings left out) is listed
in the result's warnings with the size of its task vector, never dropped silently. GPT-2's
Conv1D (weights stored in x out) is written with ``fan_in_fan_out``. Module kinds come from the
architecture built on the meta device from the (already validated) config: no weights, no code
from the folder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field

from engine.errors import ConfigError, ParameterError
from engine.export_card import CARD_NAME, extract_lora_card
from engine.io import ModelFolder, ModelWriter
from engine.lora.adapter import CONFIG_NAME, PREFIX, WEIGHTS_NAME
from engine.task_vectors import task_vector32

Progress = Callable[[float, str], None]
WORK_DTYPE = torch.float32


class ExtractOptions(BaseModel):
    """What ``extract-lora`` keeps (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")
    rank: int = Field(32, ge=1, description="most singular triplets kept per module")
    sv_cutoff: float | None = Field(None, gt=0, lt=1, description="drop s_i < sv_cutoff * s_1")
    embed_lora: bool = Field(False, description="embedding LoRA for the input embeddings and head")
    save_modules: list[str] = Field(default_factory=list, description="modules stored whole")
    dtype: str = Field("float32", pattern="^(float32|float16|bfloat16)$",
                       description="dtype of the stored A and B")


@dataclass
class ExtractResult:
    out: Path
    modules: int
    ranks: dict[str, int]
    kept_energy: float                # sum of kept s_i^2 over sum of all s_i^2, all modules
    seconds: float
    warnings: list[str] = field(default_factory=list)


def module_kinds(config: dict) -> dict[str, str]:
    """Module name -> ``linear`` | ``conv1d`` | ``embedding`` for the architecture of
    ``config``, built on the meta device (no memory, no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it today
        Conv1D = ()  # noqa: N806
    fields = {k: v for k, v in config.items()
              if k not in ("architectures", "transformers_version", "torch_dtype", "dtype", "auto_map")}
    model_type = fields.pop("model_type", None)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **fields),
                                                     trust_remote_code=False)
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"cannot build the architecture {model_type!r} from config.json: {err}") from None
    kinds = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding):
            kinds[name] = "embedding"
        elif isinstance(module, torch.nn.Linear):
            kinds[name] = "linear"
        elif Conv1D and isinstance(module, Conv1D):
            kinds[name] = "conv1d"
    return kinds


def low_rank_factors(delta: torch.Tensor, rank: int, sv_cutoff: float | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor, float, float] | None:
    """``(A, B, kept_energy, total_energy)`` with ``B @ A`` the best approximation of ``delta``
    (out x in) of rank at most ``rank`` (and above the cut-off); None for a zero delta."""
    u, s, vh = torch.linalg.svd(delta.to(WORK_DTYPE), full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return None
    keep = min(rank, s.numel())
    if sv_cutoff is not None:
        keep = max(1, min(keep, int((s >= sv_cutoff * s[0]).sum())))
    root = s[:keep].sqrt()
    b = (u[:, :keep] * root).contiguous()
    a = (root[:, None] * vh[:keep]).contiguous()
    energy = s.double().square()
    return a, b, float(energy[:keep].sum()), float(energy.sum())


def _saved(module: str, save_modules: list[str]) -> bool:
    return any(module == m or module.endswith(f".{m}") for m in save_modules)


def extract_lora(base_path: str | Path, finetuned_path: str | Path, out: str | Path,
                 options: ExtractOptions | dict | None = None, *,
                 progress: Progress | None = None) -> ExtractResult:
    """Write a PEFT LoRA adapter of ``finetuned - base`` to ``out`` (atomic, verified), with
    its model card (README.md) in the same write."""
    started = time.perf_counter()
    opts = options if isinstance(options, ExtractOptions) else ExtractOptions(**(options or {}))
    dtype = getattr(torch, opts.dtype)
    warnings: list[str] = []
    with ModelFolder(base_path) as base, ModelFolder(finetuned_path) as ft:
        from engine.compat import require_compatible

        require_compatible(base, [ft])
        kinds = module_kinds(base.config)
        unknown = [m for m in opts.save_modules
                   if not any(n == m or n.endswith(f".{m}") for n in kinds)
                   and not any(t.rsplit(".", 1)[0].endswith(m) for t in base.tensor_names)]
        if unknown:
            raise ParameterError(f"save_modules: {unknown[0]!r} names no module of the base",
                                 path=base.path)
        tensors: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        kept = total = 0.0
        targets, whole_modules, fan_in_fan_out = [], set(), set()
        left_out: list[str] = []
        names = base.tensor_names
        for i, name in enumerate(names):
            if progress is not None:
                progress(i / len(names), name)
            if name not in ft or not base.info(name).dtype.is_floating_point:
                continue
            module, _, leaf = name.rpartition(".")
            delta = task_vector32(base.read_tensor(name).to(WORK_DTYPE), ft, name)
            if _saved(module, opts.save_modules):
                tensors[f"{PREFIX}{name}"] = (delta + base.read_tensor(name).to(WORK_DTYPE)).to(dtype)
                whole_modules.add(module)
                continue
            norm = float(delta.norm())
            if norm == 0.0:
                continue
            kind = kinds.get(module)
            embedding_or_head = kind == "embedding" or _is_head(module, base)
            lora_ok = (leaf == "weight" and delta.dim() == 2 and kind in ("linear", "conv1d", "embedding")
                       and (opts.embed_lora or not embedding_or_head))
            if not lora_ok:
                left_out.append(f"{name} (|delta| {norm:.3g})")
                continue
            matrix = delta.T if kind in ("conv1d", "embedding") else delta  # as out x in
            factors = low_rank_factors(matrix, opts.rank, opts.sv_cutoff)
            if factors is None:
                continue
            a, b, k, t = factors
            kept, total = kept + k, total + t
            ranks[module] = a.shape[0]
            if kind == "embedding":
                tensors[f"{PREFIX}{module}.lora_embedding_A"] = a.to(dtype)
                tensors[f"{PREFIX}{module}.lora_embedding_B"] = b.to(dtype)
            else:
                tensors[f"{PREFIX}{module}.lora_A.weight"] = a.to(dtype)
                tensors[f"{PREFIX}{module}.lora_B.weight"] = b.to(dtype)
            if kind == "conv1d":
                fan_in_fan_out.add(module)
            targets.append(module)
        if not targets and not whole_modules:
            raise ParameterError("nothing to extract: no linear layer's task vector is non-zero",
                                 path=ft.path)
        if fan_in_fan_out and len(fan_in_fan_out) != len(targets):
            raise ParameterError("the model mixes Conv1D and Linear layers with task vectors; "
                                 "PEFT's fan_in_fan_out is one setting per adapter", path=ft.path)
        if left_out:
            shown = ", ".join(left_out[:4]) + (f" (+{len(left_out) - 4} more)" if len(left_out) > 4 else "")
            warnings.append(f"left out of the adapter (not a linear layer, or embeddings without "
                            f"embed_lora): {shown}")
        common = max(set(ranks.values()), key=list(ranks.values()).count) if ranks else opts.rank
        pattern = {m: r for m, r in ranks.items() if r != common}
        config = {
            "peft_type": "LORA", "r": common, "lora_alpha": common,
            "rank_pattern": pattern, "alpha_pattern": dict(pattern),
            "target_modules": sorted(targets), "modules_to_save": sorted(whole_modules) or None,
            "fan_in_fan_out": bool(fan_in_fan_out), "use_rslora": False, "use_dora": False,
            "bias": "none", "lora_dropout": 0.0, "init_lora_weights": True,
            "inference_mode": True, "task_type": "CAUSAL_LM",
            "base_model_name_or_path": str(base.path),
        }
        energy = kept / total if total else 1.0
        card = extract_lora_card(base=base.path, finetuned=ft.path, options=opts.model_dump(mode="json"))
        extra = {CARD_NAME: card.encode()}
        manifest = {"kind": "extract-lora", "base": str(base.path), "finetuned": str(ft.path),
                    "options": opts.model_dump(mode="json"), "ranks": ranks,
                    "kept_energy": energy, "warnings": warnings}
        with ModelWriter(out, config=config, extra_files=extra, manifest_extra=manifest,
                         input_folders=[base.path, ft.path], max_shard_bytes=2**62,
                         weights_name=WEIGHTS_NAME, config_name=CONFIG_NAME) as writer:
            for name in sorted(tensors):
                writer.add_tensor(name, tensors.pop(name))
    return ExtractResult(out=Path(out), modules=len(targets), ranks=ranks, kept_energy=energy,
                         seconds=time.perf_counter() - started, warnings=warnings)


def _is_head(module: str, base: ModelFolder) -> bool:
    from engine.compat import embed_head_names

    _, head = embed_head_names(base)
    return head is not None and head.rpartition(".")[0] == module
