"""Run a merge recipe tensor by tensor: read, merge in fp32 (on CUDA when present), cast, write.

Memory stays at about one tensor per input model plus the writer's shard buffer: inputs are
opened lazily (``ModelFolder``) and only the tensor being merged, and the next one (read by a
prefetch thread while the current one is computed), are in RAM.

Everything that can be checked before work starts is checked first: the recipe, every model
folder, the compatibility report (all mismatches at once), and the parameters resolved for
every tensor (gradients and filters), so a bad value fails in a second, not after an hour.
"""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from pydantic import BaseModel

from engine.compat import embed_head_names, is_tied, require_compatible
from engine.device import compute_device
from engine.errors import ConfigError, NonFiniteError, ParameterError
from engine.io import ModelFolder, ModelWriter
from engine.merge.params import layer_index_of, resolve_all
from engine.merge.registry import MergeMethod, get_method
from engine.recipe import DTYPES, MergeRecipe

# Files copied from the tokenizer source next to the merged weights (when present).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json",
)
RECIPE_FILE = "merge_recipe.yml"

Progress = Callable[[float, str], None]


@dataclass
class MergePlan:
    """A validated recipe bound to opened model folders."""

    recipe: MergeRecipe
    method: MergeMethod
    base: ModelFolder | None          # the base model (None for base-free methods without one)
    layout: ModelFolder               # whose tensor names/order/config the output follows
    models: list[ModelFolder]         # the inputs merged (the base excluded)
    model_settings: list[dict]        # raw per-model parameter settings from the recipe
    tokenizer_folder: ModelFolder
    vocab_target: int | None
    num_layers: int | None
    warnings: list[str] = field(default_factory=list)

    def close(self) -> None:
        for folder in {id(f): f for f in [self.layout, self.tokenizer_folder, *self.models,
                                           *([self.base] if self.base else [])]}.values():
            folder.close()


@dataclass
class MergeResult:
    out: Path
    tensors: int
    seconds: float
    device: str
    warnings: list[str]


def _resolve_model_path(ref: str, recipe_dir: Path | None) -> Path:
    if "+" in ref and not Path(ref).exists():
        raise ConfigError("LoRA references (model+adapter) are not supported; merge the adapter first",
                          path=ref)
    candidates = [Path(ref).expanduser()]
    if recipe_dir is not None and not Path(ref).is_absolute():
        candidates.insert(0, recipe_dir / ref)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise ConfigError("no such local model folder (only local folders are read; nothing is "
                      "downloaded)", path=ref)


def _split_params(method: MergeMethod, settings: dict) -> tuple[dict, dict]:
    """Split a parameter mapping into (global, per-model) keys by the method's classes."""
    def names(cls: type[BaseModel]) -> set[str]:
        out = set()
        for key, info in cls.model_fields.items():
            out.add(key)
            if info.alias:
                out.add(info.alias)
        return out

    global_names, model_names = names(method.params_class), names(method.model_params_class)
    unknown = set(settings) - global_names - model_names
    if unknown:
        raise ParameterError(
            f"{method.name}: unknown parameter(s) {sorted(unknown)}; known: "
            f"{sorted(global_names | model_names)}"
        )
    return ({k: v for k, v in settings.items() if k in global_names},
            {k: v for k, v in settings.items() if k in model_names})


def plan_merge(recipe: MergeRecipe, *, recipe_dir: str | Path | None = None) -> MergePlan:
    """Open and check everything a merge needs; raise before any work on any problem."""
    method = get_method(recipe.merge_method)
    recipe_dir = Path(recipe_dir) if recipe_dir is not None else None
    entries = recipe.input_models()
    base_path = _resolve_model_path(recipe.base_model, recipe_dir) if recipe.base_model else None
    if method.requires_base and base_path is None:
        raise ParameterError(f"{method.name} needs a base_model")

    opened: dict[Path, ModelFolder] = {}

    def open_folder(path: Path) -> ModelFolder:
        key = path.resolve()
        if key not in opened:
            opened[key] = ModelFolder(path)
        return opened[key]

    base = open_folder(base_path) if base_path is not None else None
    models, settings = [], []
    for entry in entries:
        path = _resolve_model_path(entry.model, recipe_dir)
        if base_path is not None and path.resolve() == base_path.resolve() and method.requires_base:
            continue  # mergekit lists the base among the models; it contributes as the base
        models.append(open_folder(path))
        settings.append(entry.parameters)
    if not models:
        raise ParameterError(f"{method.name}: no models to merge besides the base")
    layout = base if base is not None else models[0]

    report = require_compatible(layout, [m for m in models if m is not layout],
                                vocab_policy=recipe.vocab_policy)
    num_layers = layout.config.get("num_hidden_layers", layout.config.get("n_layer"))
    if recipe.layer_range() is not None and num_layers is not None:
        lo, hi = recipe.layer_range()
        if (lo, hi) != (0, num_layers):
            raise ParameterError(f"slice layer_range {[lo, hi]} must cover all {num_layers} layers "
                                 "(partial slices are not supported)")

    tok_ref = recipe.tokenizer_model()
    if tok_ref == "base":
        tokenizer_folder = layout
    else:
        tokenizer_folder = open_folder(_resolve_model_path(tok_ref, recipe_dir))

    plan = MergePlan(
        recipe=recipe, method=method, base=base, layout=layout, models=models,
        model_settings=settings, tokenizer_folder=tokenizer_folder,
        vocab_target=report.info.get("vocab", {}).get("target"),
        num_layers=num_layers, warnings=list(report.warnings),
    )
    # Resolve and validate the parameters of every tensor now (cheap), so that a bad
    # gradient or filter value fails before any tensor is read.
    for name in layout.tensor_names:
        params_for_tensor(plan, name)
    return plan


def params_for_tensor(plan: MergePlan, name: str) -> tuple[BaseModel, list[BaseModel]]:
    """Global and per-model parameters for one tensor (model scope overrides global scope)."""
    method = plan.method
    layer = layer_index_of(name)
    num_layers = plan.num_layers if layer is not None else None
    if layer is not None and num_layers is not None and layer >= num_layers:
        num_layers = layer + 1
    global_settings, model_defaults = _split_params(method, plan.recipe.parameters)
    params = method.parse_params(resolve_all(global_settings, name, layer, num_layers))
    per_model = []
    for raw in plan.model_settings:
        g, m = _split_params(method, raw)
        if g:
            raise ParameterError(f"{method.name}: {sorted(g)} are global parameters, not per-model ones")
        merged = {**resolve_all(model_defaults, name, layer, num_layers),
                  **resolve_all(m, name, layer, num_layers)}
        per_model.append(merged)
    model_params = method.parse_model_params(per_model)
    method.validate(params, model_params)
    return params, model_params


def _input_tensor(plan: MergePlan, folder: ModelFolder, name: str) -> torch.Tensor:
    """One model's tensor for an output name: tied heads read the embedding; vocab by policy."""
    embed, head = embed_head_names(folder)
    if name in folder:
        tensor = folder.get_tensor(name)
    elif name == head and embed is not None and is_tied(folder):
        tensor = folder.get_tensor(embed)
    else:  # compat has refused missing tensors already; this is a safety net
        raise ConfigError("tensor missing", path=folder.path, tensor=name)
    target = plan.vocab_target
    if target is not None and name in (embed, head) and tensor.dim() >= 1 and tensor.shape[0] != target:
        if tensor.shape[0] > target:
            tensor = tensor[:target]
        else:  # pad_from_base: rows the model lacks come from the base (a zero delta)
            base_rows = _input_tensor(plan, plan.layout, name)
            tensor = torch.cat([tensor, base_rows[tensor.shape[0]:target].to(tensor.dtype)])
    return tensor


def _tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed that does not depend on the order tensors are processed in."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def merge_one(plan: MergePlan, name: str, inputs: tuple[torch.Tensor | None, list[torch.Tensor]],
              device: torch.device, stats=None) -> torch.Tensor:
    """Merge one tensor: fp32 on `device`, returned on the CPU in fp32."""
    base_t, model_ts = inputs
    params, model_params = params_for_tensor(plan, name)
    base32 = base_t.to(device=device, dtype=torch.float32) if base_t is not None else None
    models32 = [t.to(device=device, dtype=torch.float32) for t in model_ts]
    generator = None
    if plan.method.randomized:
        generator = torch.Generator()  # masks drawn on the CPU: same on CUDA and CPU
        generator.manual_seed(_tensor_seed(plan.recipe.seed, name))
    out = plan.method.merge(base32, models32, model_params, params, name=name,
                            generator=generator, stats=stats)
    if not torch.isfinite(out).all():
        raise NonFiniteError("merge produced NaN/Inf", tensor=name)
    return out.to("cpu")


def _read_inputs(plan: MergePlan, name: str) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    base_t = _input_tensor(plan, plan.base, name) if plan.base is not None else None
    models = [_input_tensor(plan, m, name) for m in plan.models]
    for folder, t in zip([plan.base, *plan.models] if plan.base else plan.models,
                         ([base_t] if plan.base else []) + models):
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteError(f"{bad} NaN/Inf value(s) in an input; merge refused",
                                 path=folder.path, tensor=name)
    return base_t, models


def output_config(plan: MergePlan) -> dict:
    config = dict(plan.layout.config)
    if plan.recipe.dtype or plan.recipe.out_dtype:
        dtype_name = str(plan.recipe.output_dtype(torch.float32)).removeprefix("torch.")
        config["torch_dtype"] = dtype_name
        if "dtype" in config:
            config["dtype"] = dtype_name
    if plan.vocab_target is not None and config.get("vocab_size") not in (None, plan.vocab_target):
        config["vocab_size"] = plan.vocab_target
    return config


def tokenizer_files(folder: ModelFolder) -> dict[str, Path]:
    files = {}
    root = folder.path.resolve()
    for name in TOKENIZER_FILES:
        path = folder.path / name
        if path.is_file() and not path.is_symlink() and root in path.resolve().parents:
            files[name] = path
    return files


def run_merge(
    recipe: MergeRecipe,
    out: str | Path,
    *,
    recipe_dir: str | Path | None = None,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
    max_shard_bytes: int = 2**30,
    stats_provider: Callable[[str], list[torch.Tensor]] | None = None,
) -> MergeResult:
    """Merge per ``recipe`` into a new model folder ``out`` (atomic: all or nothing)."""
    started = time.perf_counter()
    device = torch.device(device) if device is not None else compute_device()
    plan = plan_merge(recipe, recipe_dir=recipe_dir)
    if plan.method.stats is not None and stats_provider is None:
        plan.close()
        raise ParameterError(f"{plan.method.name} needs calibration statistics ({plan.method.stats}); "
                             "compute them with engine.merge.calibrate")
    names = list(plan.layout.tensor_names)
    inputs_folders = [f.path for f in [plan.layout, *plan.models]]
    extra: dict = dict(tokenizer_files(plan.tokenizer_folder))
    extra[RECIPE_FILE] = recipe.to_yaml().encode()
    manifest = {"kind": "merge", "recipe": recipe.model_dump(mode="json", exclude_none=True),
                "inputs": [str(f) for f in inputs_folders], "warnings": plan.warnings}
    try:
        with ModelWriter(out, config=output_config(plan), extra_files=extra,
                         max_shard_bytes=max_shard_bytes, manifest_extra=manifest,
                         input_folders=inputs_folders) as writer, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-read") as reader:
            pending = reader.submit(_read_inputs, plan, names[0]) if names else None
            for i, name in enumerate(names):
                inputs = pending.result()
                if i + 1 < len(names):  # read the next tensor while this one is merged
                    pending = reader.submit(_read_inputs, plan, names[i + 1])
                stats = stats_provider(name) if stats_provider is not None else None
                merged = merge_one(plan, name, inputs, device, stats)
                del inputs
                fallback = plan.layout.info(name).dtype
                out_dtype = plan.recipe.output_dtype(fallback)
                writer.add_tensor(name, merged.to(out_dtype))
                if progress is not None:
                    progress((i + 1) / len(names), name)
    finally:
        plan.close()
    return MergeResult(out=Path(out), tensors=len(names), seconds=time.perf_counter() - started,
                       device=str(device), warnings=plan.warnings)


def merge_state_dicts(
    method_name: str,
    base: dict[str, torch.Tensor] | None,
    finetunes: list[dict[str, torch.Tensor]],
    model_params: list[dict],
    params: dict | None = None,
    *,
    seed: int = 0,
    num_layers: int | None = None,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """In-memory merge of state dicts (for what-if tuning): same per-tensor path as run_merge."""
    method = get_method(method_name)
    device = torch.device(device) if device is not None else compute_device()
    layout = base if base is not None else finetunes[0]
    global_settings, model_defaults = _split_params(method, dict(params or {}))
    out = {}
    for name, ref in layout.items():
        layer = layer_index_of(name)
        layers = num_layers if layer is not None else None
        if layer is not None and (layers is None or layer >= layers):
            layers = layer + 1
        p = method.parse_params(resolve_all(global_settings, name, layer, layers))
        mps = method.parse_model_params([
            {**resolve_all(model_defaults, name, layer, layers), **resolve_all(raw, name, layer, layers)}
            for raw in model_params
        ])
        method.validate(p, mps)
        generator = None
        if method.randomized:
            generator = torch.Generator()  # masks drawn on the CPU: same on CUDA and CPU
            generator.manual_seed(_tensor_seed(seed, name))
        base32 = base[name].to(device=device, dtype=torch.float32) if base is not None else None
        merged = method.merge(base32, [ft[name].to(device=device, dtype=torch.float32) for ft in finetunes],
                              mps, p, name=name, generator=generator)
        out[name] = merged.to(device="cpu", dtype=ref.dtype)
    return out


__all__ = ["DTYPES", "MergePlan", "MergeResult", "merge_state_dicts", "params_for_tensor",
           "plan_merge", "run_merge"]
