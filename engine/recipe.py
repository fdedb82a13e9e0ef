"""Merge recipes: mergekit's YAML configuration format, read unchanged, plus our methods.

A recipe names the models (or full-depth slices of them), the base model, the method and its
parameters. Parameter values may be scalars, gradients (lists interpolated over layers) or
filter conditions; they are resolved per tensor by ``engine.merge.params``.

Supported mergekit keys: ``models`` (``model`` + ``parameters``), ``slices`` (each with
``sources`` of ``model`` + half-open ``layer_range`` + ``parameters``, its own ``parameters`` and
``base_model``: one slice over every layer merges whole models, anything else is a layer stack,
``engine.merge.slices``), ``base_model``, ``merge_method``, ``parameters``, ``dtype``,
``out_dtype``, ``tokenizer_source`` and ``tokenizer`` (``source``: union, base or a model;
``tokens``; ``pad_to_multiple_of``: ``engine.merge.vocab``), ``name``, ``chat_template``. A model may be a PEFT
LoRA adapter: mergekit's ``BASE+ADAPTER`` reference, or an adapter folder alone (its base is
the recipe's ``base_model``); its task vector is read module by module (``engine.lora``). Hub
ids are refused with a clear message.

Our extensions: ``vocab_policy``, ``seed``, and ``overflow``: what happens when a merged value
does not fit the output dtype (a float32 result of 3e38 cast to float16 is Inf). ``refuse``
(the default) stops the merge naming the tensor, nothing written; ``clamp`` writes the dtype's
largest finite value of that sign instead. ``dtype``/``out_dtype`` apply to floating-point
tensors only: integer and bool tensors keep their own dtype (and are copied, never mixed).
A calibration data file (fisher/regmean's ``calibration: {data: FILE}``) passes the same path
rules as a model folder (``resolve_data_ref``).
"""

from __future__ import annotations

from pathlib import Path, PurePath
from typing import Any, Iterable, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from engine.errors import ConfigError, ParameterError, PathNotAllowedError
from engine.paths import resolve_user_path
from engine.textparse import MAX_TEXT_BYTES, parse_yaml

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
OVERFLOW_POLICIES = ("refuse", "clamp")


class InputModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class SliceSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Any] = Field(default_factory=dict)


class Slice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource] = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    base_model: str | None = None        # this slice's base (mergekit's; else the recipe's)
    residual_weight: float | None = None  # accepted as mergekit 0.1.5 accepts it, and unused there too


class ZeroEmbedding(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["zero"]


class ModelTokenEmbedding(BaseModel):
    """A given row of a given model: ``token_id``, or the id ``token`` has in its tokenizer."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["model_token"]
    model: str
    token_id: int | None = None
    token: str | None = None

    @model_validator(mode="after")
    def _one(self) -> "ModelTokenEmbedding":
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of token_id or token")
        return self


class TokenEmbedding(BaseModel):
    """mergekit's ``tokens`` entry: where the token's row comes from (a model path, zero, a
    model's given row), and ``force`` (that row in every model, even those that have the token)."""

    model_config = ConfigDict(extra="forbid")
    source: ZeroEmbedding | ModelTokenEmbedding | str | None = None
    force: bool = False


class TokenizerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str = "union"  # mergekit's default for a `tokenizer` mapping
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: int | None = Field(None, gt=0)


class MergeRecipe(BaseModel):
    """A mergekit-format merge configuration."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    models: list[InputModel] | None = None
    slices: list[Slice] | None = Field(None, min_length=1)
    base_model: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSettings | None = None
    name: str | None = None
    chat_template: str | None = None
    # Our extension: what to do when vocab sizes differ ("refuse" | "truncate" | "pad_from_base").
    vocab_policy: str = "refuse"
    # Our extension: seed for the randomized methods (dare, della, sotu).
    seed: int = 0
    # Our extension: a merged value beyond the output dtype's range ("refuse" | "clamp").
    overflow: str = "refuse"

    @model_validator(mode="after")
    def _check(self) -> "MergeRecipe":
        if (self.models is None) == (self.slices is None):
            raise ValueError("give exactly one of 'models' or 'slices'")
        for key in ("dtype", "out_dtype"):
            value = getattr(self, key)
            if value is not None and value not in DTYPES:
                raise ValueError(f"{key} {value!r} is not one of {sorted(set(DTYPES))}")
        if self.vocab_policy not in ("refuse", "truncate", "pad_from_base"):
            raise ValueError("vocab_policy must be 'refuse', 'truncate' or 'pad_from_base'")
        if self.overflow not in OVERFLOW_POLICIES:
            raise ValueError("overflow must be 'refuse' or 'clamp'")
        if self.tokenizer is not None and self.tokenizer_source is not None:
            raise ValueError("give one of tokenizer_source or tokenizer, not both (as mergekit)")
        return self

    def uniform_slice(self) -> bool:
        """Whether the recipe is ``models``, or one slice whose sources share one layer range
        (merged as ``models`` when that range is every layer; anything else is a layer stack,
        ``engine.merge.slices``)."""
        if self.slices is None:
            return True
        return (len(self.slices) == 1 and self.slices[0].base_model is None
                and len({tuple(s.layer_range) for s in self.slices[0].sources}) == 1)

    def input_models(self) -> list[InputModel]:
        """The models with their own per-model parameters (``models``, or the sources of a
        uniform slice; the slice's shared ``parameters`` are a scope of ``parameter_scopes``)."""
        if self.models is not None:
            return list(self.models)
        assert self.slices is not None
        if not self.uniform_slice():
            raise ParameterError("a layer stack (several slices, or sources of different layer "
                                 "ranges) is planned slice by slice (engine.merge.slices)")
        return [InputModel(model=s.model, parameters=dict(s.parameters)) for s in self.slices[0].sources]

    def parameter_scopes(self) -> list[dict[str, Any]]:
        """The global parameter scopes, outer to inner: the recipe's ``parameters``, then the
        slice's (mergekit reads a method's global parameters from both, the slice winning,
        and uses either as the default of every model's per-model parameters)."""
        scopes = [dict(self.parameters)]
        if self.slices is not None and len(self.slices) == 1:
            scopes.append(dict(self.slices[0].parameters))
        return scopes

    def layer_range(self) -> tuple[int, int] | None:
        if self.slices is None:
            return None
        return tuple(self.slices[0].sources[0].layer_range)

    def output_dtype(self, fallback: torch.dtype) -> torch.dtype:
        # Arithmetic is fp32 (fp64 for fp64 inputs; bf16 subtraction cancels); `dtype` (or
        # `out_dtype`) is only the dtype a float result is cast to, once, at write. An integer
        # or bool tensor (``fallback``, the layout's) is copied and keeps its dtype.
        name = self.out_dtype or self.dtype
        return DTYPES[name] if name and fallback.is_floating_point else fallback

    def tokenizer_model(self) -> str:
        """``union``, ``base`` or a model reference (``base`` when the recipe says nothing)."""
        return (self.tokenizer.source if self.tokenizer else None) or self.tokenizer_source or "base"

    def merges_tokenizer(self) -> bool:
        """Whether the recipe asks for a tokenizer (``tokenizer`` or ``tokenizer_source``): then
        embedding rows follow tokens (``engine.merge.vocab``)."""
        return self.tokenizer is not None or self.tokenizer_source is not None

    def model_refs(self) -> list[tuple[str, str]]:
        """Every model folder the recipe names, with the key that names it
        (``base_model``, ``models[1].model``, ``slices[0].sources[2].model``, the tokenizer's).
        A ``BASE+ADAPTER`` reference gives two folders: the base under the key, the adapter
        under ``<key>+adapter``."""
        refs = [("base_model", self.base_model)] if self.base_model is not None else []
        refs += [(f"models[{i}].model", m.model) for i, m in enumerate(self.models or [])]
        for i, piece in enumerate(self.slices or []):
            if piece.base_model is not None:
                refs.append((f"slices[{i}].base_model", piece.base_model))
            refs += [(f"slices[{i}].sources[{j}].model", s.model) for j, s in enumerate(piece.sources)]
        source = (self.tokenizer.source if self.tokenizer else None) or self.tokenizer_source
        if source not in (None, "base", "union"):
            refs.append(("tokenizer.source" if self.tokenizer else "tokenizer_source", source))
        for token, entry in ((self.tokenizer.tokens or {}) if self.tokenizer else {}).items():
            ref = entry.source if isinstance(entry.source, str) else getattr(entry.source, "model", None)
            if ref is not None:
                refs.append((f"tokenizer.tokens[{token!r}].source", ref))
        out = []
        for key, ref in refs:
            base, adapter = split_lora_ref(ref)
            out.append((key, base))
            if adapter is not None:
                out.append((f"{key}+adapter", adapter))
        return out

    def calibration_data_refs(self) -> list[tuple[str, str]]:
        """Every calibration data file the recipe names (``calibration: {data: FILE}``, global or
        per model), with the key that names it (``parameters.calibration.data``,
        ``models[1].parameters.calibration.data``, ...). A ``data`` that is not a string is
        refused naming its key."""
        scopes = [("parameters", self.parameters)]
        scopes += [(f"models[{i}].parameters", m.parameters) for i, m in enumerate(self.models or [])]
        for i, piece in enumerate(self.slices or []):
            scopes.append((f"slices[{i}].parameters", piece.parameters))
            scopes += [(f"slices[{i}].sources[{j}].parameters", s.parameters)
                       for j, s in enumerate(piece.sources)]
        refs = []
        for where, params in scopes:
            calibration = params.get("calibration")
            if not isinstance(calibration, dict) or calibration.get("data") is None:
                continue  # a calibration that is not a mapping is refused by the merge spec
            key = f"{where}.calibration.data"
            if not isinstance(calibration["data"], str) or not calibration["data"].strip():
                raise ConfigError(f"recipe key {key}: a calibration data file is a path (a "
                                  f"non-empty string), got {calibration['data']!r}")
            refs.append((key, calibration["data"]))
        return refs

    def to_yaml(self) -> str:
        data = self.model_dump(exclude_none=True, exclude_defaults=False)
        for key in ("vocab_policy", "seed", "overflow"):
            if data.get(key) == MergeRecipe.model_fields[key].default:
                data.pop(key)
        if not data.get("parameters"):
            data.pop("parameters", None)
        return yaml.safe_dump(data, sort_keys=False)


def parse_recipe(data: Any, *, source: str = "recipe") -> MergeRecipe:
    if not isinstance(data, dict):
        raise ConfigError("a merge recipe is a YAML mapping", path=source)
    try:
        return MergeRecipe.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc']) or 'recipe'}: {e['msg']}" for e in err.errors()
        )
        raise ConfigError(f"invalid merge recipe: {problems}", path=source) from None


def parse_recipe_text(text: str | bytes, *, source: str = "recipe") -> MergeRecipe:
    """A recipe from YAML text (a file's content, a page's text area, a job's spec), read by
    the strict loader of ``engine.textparse``: no anchors or aliases, no duplicate keys,
    bounded depth and size."""
    return parse_recipe(parse_yaml(text, source=source), source=source)


def load_recipe(path: str | Path) -> MergeRecipe:
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_TEXT_BYTES + 1)  # never more: the size check refuses it
    except OSError as err:
        raise ConfigError(f"cannot read recipe: {err.strerror or err}", path=path) from None
    return parse_recipe_text(raw, source=str(path))


def split_lora_ref(ref: str) -> tuple[str, str | None]:
    """mergekit's ``BASE+ADAPTER`` model reference -> ``(base, adapter)``; a plain reference ->
    ``(ref, None)``. A path that itself contains '+' and exists is taken as it is."""
    if "+" not in ref or Path(ref).exists():
        return ref, None
    base, _, adapter = ref.rpartition("+")
    if not base.strip() or not adapter.strip():
        raise ConfigError("a LoRA reference is BASE+ADAPTER, both parts non-empty", path=ref)
    return base, adapter


def _resolve_ref(ref: str, *, key: str, kind: str, missing: str, recipe_dir, allowed_roots) -> Path:
    """A recipe's path reference: with ``allowed_roots`` (the app and its jobs) the typed-path
    check (``engine.paths.resolve_user_path``: absolute or relative to ``recipe_dir``, no ``~``
    or ``..``, inside a root once symlinks are resolved, a ``kind``); without (the command line:
    the user's own shell and files) tried relative to ``recipe_dir``, then here. Nothing is
    expanded or downloaded; errors name the recipe key."""
    if ref.strip().startswith("~"):
        raise PathNotAllowedError(f"recipe key {key}: '~' is not expanded; write the full path",
                                  path=ref)
    relative = not PurePath(ref).is_absolute()
    if allowed_roots is not None:
        text = str(Path(recipe_dir) / ref) if relative and recipe_dir is not None else ref
        try:
            return resolve_user_path(text, allowed_roots, kind=kind)
        except PathNotAllowedError as err:
            raise PathNotAllowedError(f"recipe key {key}: {err.reason}", path=ref) from None
    candidates = [Path(ref)]
    if recipe_dir is not None and relative:
        candidates.insert(0, Path(recipe_dir) / ref)
    for candidate in candidates:
        if (candidate.is_dir() if kind == "dir" else candidate.is_file()):
            return candidate
    raise ConfigError(f"recipe key {key}: {missing}", path=ref)


def resolve_model_ref(ref: str, *, key: str = "model", recipe_dir: str | Path | None = None,
                      allowed_roots: Iterable[str | Path] | None = None) -> Path:
    """The local folder a recipe's model reference names (rules: ``_resolve_ref``). A
    ``BASE+ADAPTER`` reference is split first (``split_lora_ref``)."""
    return _resolve_ref(ref, key=key, kind="dir", recipe_dir=recipe_dir, allowed_roots=allowed_roots,
                        missing="no such local model folder (only local folders are read; nothing "
                                "is downloaded)")


def resolve_data_ref(ref: str, *, key: str, recipe_dir: str | Path | None = None,
                     allowed_roots: Iterable[str | Path] | None = None) -> Path:
    """The local file a recipe's calibration ``data`` names, by the same rules (a regular file)."""
    return _resolve_ref(ref, key=key, kind="file", recipe_dir=recipe_dir, allowed_roots=allowed_roots,
                        missing="no such calibration data file")


def check_recipe_paths(recipe: MergeRecipe, allowed_roots: Iterable[str | Path], *,
                       recipe_dir: str | Path | None = None) -> dict[str, Path]:
    """Every model folder and calibration data file of ``recipe`` resolved inside
    ``allowed_roots`` (``{key: path}``); the first that is not raises PathNotAllowedError
    naming its recipe key."""
    roots = list(allowed_roots)
    found = {key: resolve_model_ref(ref, key=key, recipe_dir=recipe_dir, allowed_roots=roots)
             for key, ref in recipe.model_refs()}
    found.update({key: resolve_data_ref(ref, key=key, recipe_dir=recipe_dir, allowed_roots=roots)
                  for key, ref in recipe.calibration_data_refs()})
    return found
