"""Header-only compatibility report between a base model and its fine-tunes.

Reads only config.json and safetensors headers (no tensor data). Every problem is collected
before anything is reported, so the user sees all mismatches at once:

- architecture / model_type and structural config fields must match (an explicit expert
  override turns an architecture mismatch into a warning);
- every shared tensor must have the base's shape; vocabulary-sized tensors (embeddings, head)
  are compared outside their vocab dimension, and differing vocab sizes follow a policy:
  ``refuse`` (error), ``truncate`` (all cut to the smallest vocab) or ``pad_from_base``
  (result has the base vocab: rows a fine-tune lacks come from the base, i.e. a zero delta,
  and rows beyond the base are dropped);
- a model with tied embeddings and no ``lm_head.weight`` is not missing its head;
- base tensors a fine-tune lacks are errors; extra tensors (a leftover head) are warnings;
- mixed dtypes are fine (arithmetic is fp32) and reported in ``info``.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

from pydantic import BaseModel, Field

from engine.errors import IncompatibleModelsError
from engine.io.header import TORCH_TO_SAFETENSORS
from engine.io.reader import ModelFolder
from engine.tensor_names import layer_index_of

VocabPolicy = Literal["refuse", "truncate", "pad_from_base"]

# (input embedding, output head) tensor names used by common causal-LM families.
EMBED_HEAD_PAIRS = [
    ("model.embed_tokens.weight", "lm_head.weight"),
    ("transformer.wte.weight", "lm_head.weight"),
    ("gpt_neox.embed_in.weight", "embed_out.weight"),
    ("model.decoder.embed_tokens.weight", "lm_head.weight"),
    ("transformer.word_embeddings.weight", "lm_head.weight"),
]
# Config fields that change the computation even where tensor shapes agree.
STRUCTURAL_FIELDS = ["hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "intermediate_size", "head_dim"]
MAX_NAMES_SHOWN = 8


class CompatReport(BaseModel):
    ok: bool
    errors: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    info: dict[str, Any] = Field(default_factory=dict)


def _text_config(config: dict) -> dict:
    """Multimodal configs keep the language model's fields under text_config."""
    nested = config.get("text_config")
    return nested if isinstance(nested, dict) else config


def _architecture(config: dict) -> tuple[tuple[str, ...], str | None]:
    archs = config.get("architectures") or []
    return tuple(a for a in archs if isinstance(a, str)), config.get("model_type")


def embed_head_names(model: ModelFolder) -> tuple[str | None, str | None]:
    """(input embedding name, output head name) of the model's family; the head may be absent."""
    for embed, head in EMBED_HEAD_PAIRS:
        if embed in model:
            return embed, head
    return None, None


_embed_head = embed_head_names  # older private name, still imported elsewhere


def is_tied(model: ModelFolder) -> bool:
    """Tied if config says so, or (config silent) the model has an embedding but no head."""
    embed, head = embed_head_names(model)
    flag = _text_config(model.config).get("tie_word_embeddings", model.config.get("tie_word_embeddings"))
    if flag is not None:
        return bool(flag)
    return embed is not None and head not in model


def vocab_size(model: ModelFolder) -> int | None:
    """Vocab size from the embedding tensor (the truth on disk), else from config."""
    embed, _ = embed_head_names(model)
    if embed is not None and len(model.info(embed).shape) == 2:
        return model.info(embed).shape[0]
    value = _text_config(model.config).get("vocab_size")
    return value if isinstance(value, int) else None


def _vocab_tensors(model: ModelFolder) -> set[str]:
    embed, head = embed_head_names(model)
    return {n for n in (embed, head) if n is not None and n in model}


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:MAX_NAMES_SHOWN])
    return shown + (f" (+{len(names) - MAX_NAMES_SHOWN} more)" if len(names) > MAX_NAMES_SHOWN else "")


def _dtype_names(model: ModelFolder) -> list[str]:
    return sorted({TORCH_TO_SAFETENSORS[model.info(n).dtype] for n in model.tensor_names})


def compatibility_report(
    base: ModelFolder,
    finetunes: Sequence[ModelFolder],
    *,
    vocab_policy: VocabPolicy = "refuse",
    allow_architecture_mismatch: bool = False,
    layer_stack: bool = False,
) -> CompatReport:
    """Compare headers and configs of ``finetunes`` against ``base``; list every problem.

    ``layer_stack``: the models give layers to a frankenmerge (``engine.merge.slices``), so
    their depths may differ and their layer tensors are checked layer by layer there; only the
    tensors outside the layers and the other structural fields are compared here."""
    if vocab_policy not in ("refuse", "truncate", "pad_from_base"):
        raise ValueError(f"unknown vocab_policy {vocab_policy!r}")
    errors: list[str] = []
    warnings: list[str] = []
    base_arch, base_type = _architecture(base.config)
    base_vocab = vocab_size(base)
    base_vocab_tensors = _vocab_tensors(base)
    base_tied = is_tied(base)
    _, base_head = embed_head_names(base)
    info: dict[str, Any] = {
        "base": str(base.path),
        "architectures": list(base_arch),
        "model_type": base_type,
        "tensor_count": len(base.tensor_names),
        "arithmetic_dtype": "float32",
        "dtypes": {str(base.path): _dtype_names(base)},
        "tied_embeddings": {str(base.path): base_tied},
        "vocab": {"policy": vocab_policy, "base": base_vocab, "finetunes": {}},
        "missing_tensors": {},
        "extra_tensors": {},
        "shape_mismatches": {},
    }

    for ft in finetunes:
        where = str(ft.path)
        arch, mtype = _architecture(ft.config)
        if (arch and base_arch and arch != base_arch) or (mtype and base_type and mtype != base_type):
            msg = (f"{where}: architecture {list(arch)}/{mtype} differs from base "
                   f"{list(base_arch)}/{base_type}")
            (warnings if allow_architecture_mismatch else errors).append(
                msg + (" (allowed by expert override)" if allow_architecture_mismatch else ""))
        base_text, ft_text = _text_config(base.config), _text_config(ft.config)
        for key in STRUCTURAL_FIELDS:
            if layer_stack and key == "num_hidden_layers":
                continue
            if key in base_text and key in ft_text and base_text[key] != ft_text[key]:
                errors.append(f"{where}: config {key} = {ft_text[key]} differs from base {base_text[key]}")

        info["dtypes"][where] = _dtype_names(ft)
        ft_tied = is_tied(ft)
        info["tied_embeddings"][where] = ft_tied
        ft_vocab = vocab_size(ft)
        info["vocab"]["finetunes"][where] = ft_vocab
        if base_vocab is not None and ft_vocab is not None and ft_vocab != base_vocab:
            msg = f"{where}: vocab size {ft_vocab} differs from base {base_vocab}"
            if vocab_policy == "refuse":
                errors.append(msg + " (choose truncate or pad_from_base to proceed)")
            else:
                warnings.append(f"{msg}; policy {vocab_policy}")
        vocab_tensors = base_vocab_tensors | _vocab_tensors(ft)

        mismatches = []
        for name in base.tensor_names:
            if name not in ft or (layer_stack and layer_index_of(name) is not None):
                continue
            b_shape, f_shape = base.info(name).shape, ft.info(name).shape
            if name in vocab_tensors and len(b_shape) == len(f_shape) >= 1:
                same = b_shape[1:] == f_shape[1:]  # vocab dim follows the policy above
            else:
                same = b_shape == f_shape
            if not same:
                mismatches.append(name)
                errors.append(f"{where}: tensor {name!r} shape {tuple(f_shape)} != base {tuple(b_shape)}")
        info["shape_mismatches"][where] = mismatches

        # A head absent because the embeddings are tied is not missing (either side).
        missing = [n for n in base.tensor_names if n not in ft and not (n == base_head and ft_tied)
                   and not (layer_stack and layer_index_of(n) is not None)]
        extra = [n for n in ft.tensor_names if n not in base and not (n == base_head and base_tied)
                 and not (layer_stack and layer_index_of(n) is not None)]
        if base_head in base and base_head not in ft and ft_tied and not base_tied:
            warnings.append(f"{where}: ties {base_head} to its embeddings while the base has its own "
                            "head; its head is taken to be its embedding matrix")
        if base_head in ft and base_head not in base and base_tied:
            warnings.append(f"{where}: has its own {base_head} while the base ties it to the embeddings")
        if missing:
            errors.append(f"{where}: lacks {len(missing)} base tensor(s): {_names(missing)}")
        if extra:
            warnings.append(f"{where}: {len(extra)} extra tensor(s) not in base (ignored, e.g. a "
                            f"leftover head): {_names(extra)}")
        info["missing_tensors"][where] = missing
        info["extra_tensors"][where] = extra

    if len({d for names in info["dtypes"].values() for d in names}) > 1:
        info["mixed_dtypes"] = True
    vocabs = [v for v in [base_vocab, *info["vocab"]["finetunes"].values()] if v is not None]
    if vocabs:
        info["vocab"]["target"] = (min(vocabs) if vocab_policy == "truncate" else base_vocab)
    return CompatReport(ok=not errors, errors=errors, warnings=warnings, info=info)


def require_compatible(base: ModelFolder, finetunes: Sequence[ModelFolder], **options) -> CompatReport:
    """The report, or IncompatibleModelsError listing every reason at once."""
    report = compatibility_report(base, finetunes, **options)
    if not report.ok:
        raise IncompatibleModelsError(
            f"{len(report.errors)} incompatibilit{'y' if len(report.errors) == 1 else 'ies'}: "
            + "; ".join(report.errors),
            reasons=report.errors, path=base.path)
    return report
