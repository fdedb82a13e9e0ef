"""Assemble a mixture of experts from a base and fine-tunes of it (mergekit-moe's job).

``plan_moe`` opens and checks everything first (the config, every folder, every expert's
architecture and MLP shapes against the base, the output layout against transformers' own
model of it), so bad input fails before any work and nothing is written. ``run_moe`` then
computes the routers (``engine.moe.gates``) and streams the output: one output tensor at a
time (a layer's stacked experts read from each expert in turn), through the staged, verified,
atomic writer, with the base's tokenizer files, the config, a model card and a manifest
(sha256 per file, the inputs' fingerprints).

``noise_scale`` adds N(0, noise_scale^2) noise to an expert's MLP weights and
``residual_scale`` multiplies its ``down_proj``, as mergekit does (the noise from a generator
seeded by the config's ``seed``, per expert and tensor).
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from engine.compat import is_tied
from engine.device import resolve_device
from engine.errors import ConfigError, IncompatibleModelsError
from engine.export_card import CARD_NAME, model_card
from engine.io import ModelFolder, ModelWriter
from engine.io.side_files import TOKENIZER_FILES, read_side_files
from engine.moe.config import DTYPE_NAMES, PROMPT_MODES, MoEConfig, output_architecture
from engine.moe.layout import (MLP_PROJECTIONS, SOURCE_TYPES, Piece, check_against_transformers,
                               mlp_name, output_config, plan_pieces)
from engine.task_vectors import check_finite, read_model_tensor

CONFIG_FILE = "moe_config.yml"
OUT_FILES = (*TOKENIZER_FILES, "generation_config.json")
DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.float32, torch.bfloat16, torch.bfloat16,
                                torch.float16, torch.float16)))
Progress = Callable[[float, str], None]


@dataclass
class MoEPlan:
    config: MoEConfig
    architecture: str
    base: ModelFolder
    experts: list[ModelFolder]            # routed experts, in config order
    shared: list[ModelFolder]             # shared experts (Qwen MoE: one)
    keys: dict[str, Path]                 # config key -> folder
    out_config: dict
    pieces: list[Piece]
    dtype: torch.dtype
    num_layers: int
    hidden: int
    tokenizer: object = None              # the base's, for the prompt gates (left-padded with BOS)
    warnings: list[str] = field(default_factory=list)

    def close(self) -> None:
        for folder in {id(f): f for f in [self.base, *self.experts, *self.shared]}.values():
            folder.close()


def _base_dtype(base: ModelFolder) -> torch.dtype:
    name = base.config.get("dtype") or base.config.get("torch_dtype")
    if isinstance(name, str) and name in DTYPES:
        return DTYPES[name]
    return base.info("model.embed_tokens.weight").dtype if "model.embed_tokens.weight" in base else torch.float32


def _check_expert(key: str, folder: ModelFolder, base: ModelFolder, num_layers: int) -> None:
    """An expert must be the base's architecture with the base's MLP shapes in every layer."""
    reasons = []
    mine, theirs = folder.config, base.config
    for field_name in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers"):
        if mine.get(field_name) != theirs.get(field_name):
            reasons.append(f"{field_name} {mine.get(field_name)!r}, the base's is {theirs.get(field_name)!r}")
    if not reasons:
        for layer in range(num_layers):
            for proj in MLP_PROJECTIONS:
                name = mlp_name(layer, proj)
                if name not in folder:
                    reasons.append(f"no tensor {name!r}")
                elif tuple(folder.info(name).shape) != tuple(base.info(name).shape):
                    reasons.append(f"tensor {name!r} has shape {list(folder.info(name).shape)}, "
                                   f"the base's {list(base.info(name).shape)}")
                elif not folder.info(name).dtype.is_floating_point:
                    reasons.append(f"tensor {name!r} is {folder.info(name).dtype}, not floating point")
    if reasons:
        raise IncompatibleModelsError(f"config key {key}: not an expert of this base: "
                                      + "; ".join(reasons[:6]), reasons=reasons, path=folder.path)


def plan_moe(config: MoEConfig, *, config_dir: str | Path | None = None,
             allowed_roots: Iterable[str | Path] | None = None) -> MoEPlan:
    """Open and check everything an assembly needs; raise before any work on any problem."""
    from engine.lora import is_adapter_folder
    from engine.recipe import resolve_model_ref

    architecture = output_architecture(config)
    roots = list(allowed_roots) if allowed_roots is not None else None
    keys = {}
    for key, ref in config.model_refs():  # every path first: a missing one fails before any open
        path = resolve_model_ref(ref, key=key, recipe_dir=config_dir, allowed_roots=roots)
        if is_adapter_folder(path):
            raise ConfigError(f"config key {key}: a LoRA adapter folder; an expert is a full "
                              "model folder (merge the adapter first)", path=path)
        keys[key] = path
    opened: dict[Path, ModelFolder] = {}
    try:
        def open_key(key: str) -> ModelFolder:
            path = keys[key].resolve()
            if path not in opened:
                opened[path] = ModelFolder(path)
            return opened[path]

        base = open_key("base_model")
        model_type = base.config.get("model_type")
        if model_type not in SOURCE_TYPES[architecture]:
            raise IncompatibleModelsError(
                f"config key base_model: a {architecture} output is built from "
                f"{' or '.join(SOURCE_TYPES[architecture])} models, this is {model_type!r}",
                path=base.path)
        num_layers = int(base.config.get("num_hidden_layers") or 0)
        hidden = int(base.config.get("hidden_size") or 0)
        intermediate = int(base.config.get("intermediate_size") or 0)
        if min(num_layers, hidden, intermediate) <= 0:
            raise ConfigError("config key base_model: config.json lacks num_hidden_layers, "
                              "hidden_size or intermediate_size", path=base.path)
        experts = [open_key(f"experts[{i}].source_model") for i in range(len(config.experts))]
        shared = [open_key(f"shared_experts[{i}].source_model")
                  for i in range(len(config.shared_experts or []))]
        for key, folder in [(f"experts[{i}].source_model", f) for i, f in enumerate(experts)] + \
                [(f"shared_experts[{i}].source_model", f) for i, f in enumerate(shared)]:
            if folder is not base:
                _check_expert(key, folder, base, num_layers)
        _check_expert("base_model", base, base, num_layers)  # the base's own MLPs exist
        warnings = []
        if config.gate_mode in PROMPT_MODES and "model.embed_tokens.weight" not in base:
            raise ConfigError("config key base_model: no tensor 'model.embed_tokens.weight' "
                              "for the prompt gates", path=base.path)
        tokenizer = None
        if config.gate_mode in PROMPT_MODES:  # vetted side files, a private copy for transformers
            from engine.evaluate.loading import load_tokenizer
            from engine.moe.gates import prepare_tokenizer

            try:
                tokenizer = prepare_tokenizer(load_tokenizer(base.path, base.config.get("vocab_size")))
            except ConfigError as err:
                raise ConfigError(f"config key base_model: gate_mode {config.gate_mode} encodes the "
                                  f"prompts with the base's tokenizer: {err.reason}",
                                  path=base.path) from None
        tied = is_tied(base)
        write_head = not tied or config.tied_embeddings == "untie"
        dtype = DTYPES[config.dtype] if config.dtype else _base_dtype(base)
        out_config = output_config(architecture, base.config, num_experts=len(experts),
                                   experts_per_token=config.experts_per_token, dtype=dtype,
                                   tied=tied and not write_head)
        pieces = plan_pieces(architecture, base, num_layers=num_layers, num_experts=len(experts),
                             hidden=hidden, intermediate=intermediate, write_head=write_head,
                             config=out_config)
        check_against_transformers(pieces, out_config, base.path)
        if len(experts) > 1 and all(f is experts[0] for f in experts[1:]):  # mergekit refuses
            warnings.append("every expert is the same model: the MoE computes that model's "
                            "function with more memory (useful only as a start for training)")
        if len(experts) & (len(experts) - 1):
            warnings.append(f"{len(experts)} experts is not a power of two (llama.cpp needs one)")
        return MoEPlan(config=config, architecture=architecture, base=base, experts=experts,
                       shared=shared, keys=keys, out_config=out_config, pieces=pieces, dtype=dtype,
                       num_layers=num_layers, hidden=hidden, tokenizer=tokenizer, warnings=warnings)
    except BaseException:
        for folder in opened.values():
            folder.close()
        raise


def compute_gates(plan: MoEPlan, *, device: torch.device, progress: Progress | None = None) -> torch.Tensor:
    """``(layers, routed + shared-with-gates, hidden)`` router rows (``engine.moe.gates``)."""
    from engine.moe.gates import gate_vectors

    config = plan.config
    need = list(config.experts) + list(config.shared_experts or [])
    kwargs: dict = {}
    if config.gate_mode in PROMPT_MODES:
        kwargs["tokenizer"] = plan.tokenizer
        if config.gate_mode == "cheap_embed":
            kwargs["embed"] = read_model_tensor(plan.base, "model.embed_tokens.weight")
        else:
            dtype = torch.bfloat16 if config.hidden_dtype == "bfloat16" else torch.float32
            model = gate_model(plan.base, dtype)
            kwargs["model"] = model.to(device)

    def step(done: int, total: int) -> None:
        if progress is not None:
            progress(0.0, f"gates: expert {done}/{total}")

    return gate_vectors(config.gate_mode, need, num_layers=plan.num_layers, hidden_size=plan.hidden,
                        seed=config.seed, progress=step, **kwargs)


def gate_model(base: ModelFolder, dtype: torch.dtype):
    """The base as a causal LM for the hidden-state gates, built the way transformers' pretrained
    loader with a ``dtype`` builds it for mergekit: parameters in ``dtype``, buffers (RoPE's inverse frequencies) in
    float32 (casting the whole module would round them and move every layer's state). Loaded one
    tensor at a time into the parameters (memory: the model in ``dtype`` plus one tensor)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in base.config.items()
              if k not in ("model_type", "architectures", "transformers_version", "torch_dtype",
                           "dtype", "auto_map")}  # the folder's config was vetted when opened
    cfg = AutoConfig.for_model(base.config["model_type"], **fields)
    model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=False, dtype=dtype).eval()
    state = model.state_dict()
    loaded = set()
    with torch.no_grad():
        for name in base.tensor_names:
            if name not in state or tuple(state[name].shape) != tuple(base.info(name).shape):
                raise ConfigError("config key base_model: a tensor its architecture does not have "
                                  "(or of another shape)", path=base.path, tensor=name)
            state[name].copy_(read_model_tensor(base, name))
            loaded.add(name)
    missing = set(state) - loaded - ({"lm_head.weight"} if is_tied(base) else set())
    if missing:
        raise ConfigError("config key base_model: tensor missing", path=base.path, tensor=sorted(missing)[0])
    return model


def _expert_tensor(plan: MoEPlan, index: int, folder: ModelFolder, name: str, *, shared: bool) -> torch.Tensor:
    expert = (plan.config.shared_experts if shared else plan.config.experts)[index]
    tensor = read_model_tensor(folder, name)
    check_finite(tensor, folder, name, "MoE assembly refused")
    tensor = tensor.to(torch.float32)
    if expert.noise_scale is not None:
        # a stable per-(seed, expert, tensor) stream (Python's str hash changes per process)
        seed = zlib.crc32(f"{plan.config.seed}/{'shared' if shared else 'routed'}/{index}/{name}".encode())
        noise = torch.randn(tensor.shape, generator=torch.Generator().manual_seed(seed))
        tensor = tensor + noise * expert.noise_scale
    if name.endswith("down_proj.weight") and expert.residual_scale is not None:
        tensor = tensor * expert.residual_scale
    return tensor


def _make(plan: MoEPlan, piece: Piece, gates: torch.Tensor) -> torch.Tensor:
    """One output tensor, in float32 (cast once, at write)."""
    routed = len(plan.experts)
    if piece.kind == "copy":
        tensor = read_model_tensor(plan.base, piece.source)
        check_finite(tensor, plan.base, piece.source, "MoE assembly refused")
        return tensor
    if piece.kind == "experts_gate_up":
        return torch.stack([torch.cat([_expert_tensor(plan, i, f, mlp_name(piece.layer, "gate_proj"), shared=False),
                                       _expert_tensor(plan, i, f, mlp_name(piece.layer, "up_proj"), shared=False)])
                            for i, f in enumerate(plan.experts)])
    if piece.kind == "experts_down":
        return torch.stack([_expert_tensor(plan, i, f, mlp_name(piece.layer, "down_proj"), shared=False)
                            for i, f in enumerate(plan.experts)])
    if piece.kind == "shared":
        return _expert_tensor(plan, 0, plan.shared[0], piece.source, shared=True)
    if piece.kind == "router":
        return gates[piece.layer, :routed, :]
    if piece.kind == "shared_router":
        return gates[piece.layer, routed:routed + 1, :]
    if piece.kind == "zeros":
        return torch.zeros(piece.shape)
    raise AssertionError(piece.kind)


def _fingerprints(plan: MoEPlan) -> dict:
    return {key: {"path": str(path), "files": _folder(plan, path).file_fingerprints()}
            for key, path in plan.keys.items()}


def _folder(plan: MoEPlan, path: Path) -> ModelFolder:
    for folder in [plan.base, *plan.experts, *plan.shared]:
        if folder.path.resolve() == path.resolve():
            return folder
    raise AssertionError(path)


@dataclass
class MoEResult:
    out: Path
    tensors: int
    seconds: float
    device: str
    architecture: str
    warnings: list[str]


def run_moe(config: MoEConfig, out: str | Path, *, config_dir: str | Path | None = None,
            device: torch.device | str | None = None, progress: Progress | None = None,
            max_shard_bytes: int = 2**30, allowed_roots: Iterable[str | Path] | None = None) -> MoEResult:
    """Assemble per ``config`` into a new model folder ``out`` (atomic: all or nothing)."""
    started = time.perf_counter()
    device = resolve_device(device)
    plan = plan_moe(config, config_dir=config_dir, allowed_roots=allowed_roots)
    try:
        extra: dict = dict(read_side_files(plan.base.path, OUT_FILES))
        if progress is not None:
            progress(0.0, f"gates ({config.gate_mode})")
        gates = compute_gates(plan, device=device, progress=progress)
        plan.warnings += degenerate_gate_warnings(gates[:, :len(plan.experts), :])
        extra[CONFIG_FILE] = config.to_yaml().encode()
        inputs = [plan.keys[f"experts[{i}].source_model"] for i in range(len(plan.experts))]
        inputs += [plan.keys[f"shared_experts[{i}].source_model"] for i in range(len(plan.shared))]
        card = model_card(base=plan.base.path, inputs=inputs, method="moe",
                          parameters={"architecture": plan.architecture, "gate_mode": config.gate_mode,
                                      "experts_per_token": config.experts_per_token,
                                      "experts": len(plan.experts), "shared_experts": len(plan.shared)},
                          recipe=config.to_yaml(), tags=["moe", plan.architecture.lower().replace(" ", "-")])
        extra[CARD_NAME] = card.encode()
        manifest = {"kind": "moe", "config": config.model_dump(mode="json", exclude_none=True),
                    "architecture": plan.architecture, "inputs": _fingerprints(plan),
                    "warnings": plan.warnings}
        layout = [(p.name, plan.dtype, p.shape) for p in plan.pieces]
        with ModelWriter(out, config=plan.out_config, extra_files=extra, max_shard_bytes=max_shard_bytes,
                         manifest_extra=manifest, input_folders=[f.path for f in
                                                                 [plan.base, *plan.experts, *plan.shared]],
                         plan=layout) as writer:
            for i, piece in enumerate(plan.pieces):
                tensor = _make(plan, piece, gates).to(plan.dtype).contiguous()
                writer.add_tensor(piece.name, tensor)
                del tensor
                if progress is not None:
                    progress((i + 1) / len(plan.pieces), piece.name)
    finally:
        plan.close()
    return MoEResult(out=Path(out), tensors=len(plan.pieces), seconds=time.perf_counter() - started,
                     device=str(device), architecture=plan.architecture, warnings=plan.warnings)


def degenerate_gate_warnings(gates: torch.Tensor, threshold: float = 5.0) -> list[str]:
    """mergekit's warning: a layer whose router rows are nearly dependent (condition number
    above ``threshold``) routes most tokens to a few experts."""
    bad = [layer for layer in range(gates.shape[0])
           if float(torch.linalg.cond(gates[layer].double())) > threshold]
    if not bad:
        return []
    return [f"router rows of layer(s) {', '.join(map(str, bad[:8]))}{' ...' if len(bad) > 8 else ''} "
            "are nearly dependent (condition number > 5): the prompts may be too similar"]
