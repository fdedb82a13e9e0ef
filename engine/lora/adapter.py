"""A PEFT LoRA adapter folder read as a fine-tune: its task vector, module by module.

A LoRA adapter stores, per targeted module ``m`` of the base, two small matrices ``A`` (r x in)
and ``B`` (out x r); the fine-tuned weight is ``W + scale * B @ A`` with
``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` under rsLoRA). So the task vector of
``m.weight`` is ``scale * B @ A``, computed here one module at a time in float32 and never
added into a copy of the model. Details PEFT's own merge follows and so do we:

- ``rank_pattern`` / ``alpha_pattern`` override ``r`` / ``lora_alpha`` for the modules whose
  name ends with the pattern (PEFT's rule: ``re.match(rf"(.*\\.)?({pattern})$", module)``, the
  first pattern in the file's order that matches).
- ``fan_in_fan_out`` (GPT-2's Conv1D stores weights as in x out): the product is transposed.
- Embeddings (``lora_embedding_A`` r x vocab, ``lora_embedding_B`` dim x r): the product is
  transposed to vocab x dim.
- ``lora_bias``: ``lora_B.bias * scale`` is the task vector of ``m.bias``.
- Whole tensors (``modules_to_save``, trained biases, an embedding saved with
  ``save_embedding_layers``): the task vector is the saved tensor minus the base's.

The folder is hostile until checked: only ``adapter_config.json`` (small, strict JSON) and
``adapter_model.safetensors`` (our strict header parser) are read; pickle adapters are refused
unopened; a DoRA or other adapter type, or a config key that changes how the adapter applies
(PiSSA-style initialisations that also rewrote the base, layer replication, ...), is refused
with a one-line error naming the key; every tensor must map to a base tensor of the right shape.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open

from engine.errors import CheckpointFormatError, ConfigError, IncompatibleModelsError, UnsafeFormatError
from engine.io.header import read_header
from engine.io.reader import _read_small_json, _regular_file_inside

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
PREFIX = "base_model.model."
WORK_DTYPE = torch.float32

# Config keys that do not change what the saved tensors mean (or only matter while training).
_HARMLESS_KEYS = {
    "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "exclude_modules",
    "fan_in_fan_out", "inference_mode", "init_lora_weights", "layers_pattern",
    "layers_to_transform", "lora_alpha", "lora_bias", "lora_dropout", "modules_to_save",
    "peft_type", "peft_version", "r", "rank_pattern", "revision", "target_modules",
    "task_type", "use_rslora", "use_dora", "megatron_core", "qalora_group_size",
    "ensure_weight_tying", "runtime_config", "eva_config", "loftq_config", "corda_config",
    "lora_ga_config",
}
# Initialisations that also rewrite the base weights: the saved A, B are relative to a base
# the user no longer has (PEFT converts them to plain LoRA only when asked at save time).
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def is_adapter_folder(path: str | Path) -> bool:
    """True when ``path`` is a folder holding an ``adapter_config.json`` (a PEFT adapter)."""
    folder = Path(path)
    return folder.is_dir() and (folder / CONFIG_NAME).exists()


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's pattern rule: the first key ``k`` with ``(.*\\.)?(k)$`` matching ``module``."""
    for pattern, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({pattern})$", module):
                return value
        except re.error:
            raise ConfigError(f"pattern {pattern!r} is not a valid regular expression") from None
    return default


@dataclass(frozen=True)
class LoraModule:
    """One targeted module: where its A and B are, its rank, scale and orientation."""

    module: str          # base module name, e.g. model.layers.0.self_attn.q_proj
    target: str          # the base tensor it changes, module + ".weight"
    a: str               # adapter tensor names
    b: str
    rank: int
    scale: float
    transpose: bool      # fan_in_fan_out or embedding: the delta is (B @ A).T
    embedding: bool


class LoraAdapter:
    """A validated PEFT LoRA adapter folder. ``delta(name, base)`` is one tensor's task vector."""

    def __init__(self, path: str | Path):
        given = Path(path)
        try:
            self.path = given.resolve(strict=True)
        except (OSError, RuntimeError):
            raise CheckpointFormatError("adapter folder not found", path=given) from None
        if not self.path.is_dir():
            raise CheckpointFormatError("not a folder", path=given)
        self.config = self._load_config()
        self.config_digest = hashlib.sha256(
            json.dumps(self.config, sort_keys=True).encode()).hexdigest()
        self.weights_path = self._weights_file()
        self.header = read_header(self.weights_path)
        self._handle = None
        self.modules: dict[str, LoraModule] = {}   # base tensor name -> module (weights)
        self.bias_of: dict[str, tuple[str, float]] = {}  # base bias name -> (lora_B.bias, scale)
        self.whole: dict[str, str] = {}             # base tensor name -> saved full tensor
        self._index_tensors()

    # ------------------------------------------------------------------ reading the folder
    def _load_config(self) -> dict:
        config_path = self.path / CONFIG_NAME
        try:
            real = _regular_file_inside(self.path, CONFIG_NAME, CONFIG_NAME)
        except CheckpointFormatError as err:
            raise ConfigError(err.reason, path=config_path) from None
        config = _read_small_json(real, ConfigError, CONFIG_NAME)
        if not isinstance(config, dict):
            raise ConfigError(f"{CONFIG_NAME} must hold a JSON object", path=config_path)
        kind = config.get("peft_type")
        if kind != "LORA":
            raise ConfigError(f"adapter type {kind!r} is not supported (LoRA adapters only)",
                              path=config_path)
        if config.get("use_dora"):
            raise ConfigError("DoRA adapters are not supported (use_dora: true): their magnitude "
                              "vector rescales the merged weight, it is not a plain delta",
                              path=config_path)
        init = config.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
            raise ConfigError(f"init_lora_weights {init!r} also rewrote the base weights; "
                              "convert the adapter to plain LoRA with PEFT first", path=config_path)
        for key, value in config.items():
            if key not in _HARMLESS_KEYS and value not in (None, False, {}, []):
                raise ConfigError(f"key {key!r} ({value!r:.60}) changes how the adapter applies; "
                                  "not supported", path=config_path)
        for key in ("r", "lora_alpha"):
            value = config.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"{key} must be a positive number, got {value!r}", path=config_path)
        for key in ("rank_pattern", "alpha_pattern"):
            if not isinstance(config.get(key) or {}, dict):
                raise ConfigError(f"{key} must be an object", path=config_path)
        return config

    def _weights_file(self) -> Path:
        if not (self.path / WEIGHTS_NAME).exists():
            pickles = [n for n in PICKLE_NAMES if (self.path / n).exists()]
            if pickles:
                raise UnsafeFormatError(f"pickle adapter refused ({pickles[0]}): pickle can run code; "
                                        "save it with safetensors", path=self.path / pickles[0])
            raise CheckpointFormatError(f"no {WEIGHTS_NAME} in the adapter folder", path=self.path)
        return _regular_file_inside(self.path, WEIGHTS_NAME, WEIGHTS_NAME)

    def _module_rank_scale(self, module: str) -> tuple[int, float]:
        cfg = self.config
        rank = _pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"])
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise ConfigError(f"rank {rank!r} of module {module!r} is not a positive integer",
                              path=self.path / CONFIG_NAME)
        root = math.sqrt(rank) if cfg.get("use_rslora") else rank
        return rank, float(alpha) / root

    def _index_tensors(self) -> None:
        pairs: dict[str, dict[str, str]] = {}
        for stored in self.header.order:
            if not stored.startswith(PREFIX):
                raise CheckpointFormatError(f"adapter tensor name does not start with {PREFIX!r}",
                                            path=self.weights_path, tensor=stored)
            name = stored[len(PREFIX):]
            for suffix, role in ((".lora_A.weight", "A"), (".lora_B.weight", "B"),
                                 (".lora_embedding_A", "eA"), (".lora_embedding_B", "eB"),
                                 (".lora_B.bias", "bias")):
                if name.endswith(suffix):
                    pairs.setdefault(name[: -len(suffix)], {})[role] = stored
                    break
            else:
                if name.endswith(".lora_magnitude_vector") or ".lora_magnitude_vector." in name:
                    raise ConfigError("DoRA magnitude vectors found: DoRA is not supported",
                                      path=self.weights_path)
                if ".lora_" in name:
                    raise CheckpointFormatError("unknown LoRA tensor kind", path=self.weights_path,
                                                tensor=stored)
                # save_embedding_layers stores the embedding under base_layer
                self.whole[name.replace(".base_layer.", ".")] = stored
        fan_in_fan_out = bool(self.config.get("fan_in_fan_out"))
        for module, roles in sorted(pairs.items()):
            embedding = "eA" in roles or "eB" in roles
            a, b = (roles.get("eA"), roles.get("eB")) if embedding else (roles.get("A"), roles.get("B"))
            if a is None or b is None:
                raise CheckpointFormatError(f"module {module!r} has only one of its LoRA A and B",
                                            path=self.weights_path, tensor=a or b or roles.get("bias"))
            rank, scale = self._module_rank_scale(module)
            a_shape, b_shape = self.header.entries[a].shape, self.header.entries[b].shape
            if len(a_shape) != 2 or len(b_shape) != 2:
                raise CheckpointFormatError("LoRA A and B must be matrices", path=self.weights_path,
                                            tensor=a)
            if a_shape[0] != b_shape[1]:
                raise CheckpointFormatError(f"rank mismatch in module {module!r}: A has {a_shape[0]} "
                                            f"rows, B {b_shape[1]} columns", path=self.weights_path,
                                            tensor=a)
            if a_shape[0] != rank:
                raise CheckpointFormatError(f"module {module!r} has rank {a_shape[0]} but "
                                            f"{CONFIG_NAME} says r={rank}", path=self.weights_path,
                                            tensor=a)
            self.modules[f"{module}.weight"] = LoraModule(
                module=module, target=f"{module}.weight", a=a, b=b, rank=rank, scale=scale,
                transpose=embedding or fan_in_fan_out, embedding=embedding)
            if "bias" in roles:
                self.bias_of[f"{module}.bias"] = (roles["bias"], scale)
        if not self.modules and not self.whole:
            raise CheckpointFormatError("the adapter holds no tensors", path=self.weights_path)

    # ------------------------------------------------------------------ against a base
    @property
    def targets(self) -> list[str]:
        """Base tensor names this adapter changes."""
        return sorted(set(self.modules) | set(self.bias_of) | set(self.whole))

    def _shape(self, stored: str) -> tuple[int, ...]:
        return tuple(self.header.entries[stored].shape)

    def delta_shape(self, name: str) -> tuple[int, ...]:
        """The shape of the task vector of base tensor ``name`` as the adapter stores it."""
        if name in self.modules:
            mod = self.modules[name]
            out, inn = self._shape(mod.b)[0], self._shape(mod.a)[1]
            return (inn, out) if mod.transpose else (out, inn)
        if name in self.bias_of:
            return self._shape(self.bias_of[name][0])
        return self._shape(self.whole[name])

    def check_base(self, base_shapes: dict[str, tuple[int, ...]], base_path: str | Path) -> None:
        """Every target exists in the base with the shape the adapter implies; an adapter that
        names nothing in the base (another architecture) is refused naming a module."""
        missing = [n for n in self.targets if n not in base_shapes]
        if missing and len(missing) == len(self.targets):
            raise IncompatibleModelsError(
                f"the adapter's modules name nothing in the base (first: {missing[0]!r}); "
                "an adapter for another architecture?", path=self.path, tensor=missing[0])
        if missing:
            raise IncompatibleModelsError(f"adapter module {missing[0]!r} is not in the base "
                                          f"{base_path}", path=self.path, tensor=missing[0])
        for name in self.targets:
            want, have = self.delta_shape(name), tuple(base_shapes[name])
            if want != have:
                raise IncompatibleModelsError(f"adapter shape {want} does not match the base's "
                                              f"{have} ({base_path})", path=self.path, tensor=name)

    # ------------------------------------------------------------------ tensors
    def _get(self, stored: str) -> torch.Tensor:
        if self._handle is None:
            try:
                self._handle = safe_open(str(self.weights_path), framework="pt", device="cpu")
            except (SafetensorError, OSError) as err:
                raise CheckpointFormatError(f"safetensors refused the file: {err}",
                                            path=self.weights_path) from None
        try:
            return self._handle.get_tensor(stored)
        except (SafetensorError, OSError) as err:
            raise CheckpointFormatError(f"cannot read tensor: {err}", path=self.weights_path,
                                        tensor=stored) from None

    def delta(self, name: str, base: torch.Tensor | None = None,
              device: torch.device | str | None = None) -> torch.Tensor | None:
        """The float32 task vector of base tensor ``name``, or None where the adapter leaves it
        unchanged. ``base`` (the base tensor, any dtype) is needed for whole saved tensors."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        result = None
        if name in self.whole:
            if base is None:
                raise ValueError(f"the base tensor is needed for {name!r}")
            result = self._get(self.whole[name]).to(device, WORK_DTYPE) - base.to(device, WORK_DTYPE)
        if name in self.modules:
            mod = self.modules[name]
            a = self._get(mod.a).to(device, WORK_DTYPE)
            b = self._get(mod.b).to(device, WORK_DTYPE)
            product = (b @ a).mul_(mod.scale)
            if mod.transpose:
                product = product.T.contiguous()
            result = product if result is None else result.add_(product)
        if name in self.bias_of:
            stored, scale = self.bias_of[name]
            result = self._get(stored).to(device, WORK_DTYPE).mul(scale)
        return result

    def iter_deltas(self, base_tensors: Iterable[tuple[str, torch.Tensor]]):
        """``(name, delta)`` for every base tensor given that the adapter changes."""
        for name, tensor in base_tensors:
            d = self.delta(name, tensor)
            if d is not None:
                yield name, d

    def file_fingerprints(self) -> dict[str, dict]:
        """The weights file's size, mtime and header digest, with the config's digest (a
        changed rank or alpha is a different fine-tune)."""
        h = self.header
        return {self.weights_path.name: {"size": h.file_size, "mtime_ns": h.mtime_ns,
                                         "header_sha256": h.header_sha256,
                                         "config_sha256": self.config_digest}}

    def base_model_path(self) -> str | None:
        value = self.config.get("base_model_name_or_path")
        return value if isinstance(value, str) and value else None

    def close(self) -> None:
        self._handle = None

    def __enter__(self) -> "LoraAdapter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LoraAdapter({str(self.path)!r}, modules={len(self.modules)}, whole={len(self.whole)})"
