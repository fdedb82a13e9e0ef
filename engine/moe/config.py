"""mergekit-moe's config format, unchanged, read strictly.

The keys are mergekit 0.1.5's (``base_model``, ``experts`` with ``source_model``,
``positive_prompts``, ``negative_prompts``, ``noise_scale``, ``residual_scale``, ``gate_mode``,
``dtype``, ``experts_per_token``, ``shared_experts``, ``architecture``) with its defaults
(``hidden`` gates, two experts per token). Three keys are ours, each off mergekit's path unless
set: ``seed`` (the random gates and ``noise_scale``'s noise, which mergekit draws unseeded),
``hidden_dtype`` (the dtype the hidden-state gates are computed in: mergekit's ``bfloat16`` by
default, ``float32`` for gates that bf16 rounding does not move) and ``tied_embeddings``
(``keep``: a tied base gives a tied output, as mergekit writes it; ``untie``: the head is
written out as its own tensor and the output is untied, for runtimes whose Mixtral has no
tied head).

mergekit ignores a key it does not know; here a typo (``expert_per_token``) is refused naming
the key. Every check that needs no model folder is made here, naming the config key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from engine.errors import ConfigError, ParameterError
from engine.textparse import MAX_TEXT_BYTES, parse_yaml

# mergekit's gate modes: "hidden" and "hidden_last" take the last token's hidden state,
# "hidden_avg" the mean over the prompt's tokens (ours: padding excluded, see gates.py).
GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")
PROMPT_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed")
# mergekit's output architectures, matched by prefix as mergekit does; the two we write.
OUTPUT_ARCHITECTURES = ("Mixtral", "Qwen MoE")
UNSUPPORTED_ARCHITECTURES = ("DeepSeek MoE", "Qwen3 MoE")
DTYPE_NAMES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


class Expert(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source_model: str
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = None
    residual_scale: float | None = None


class MoEConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base_model: str
    experts: list[Expert]
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: list[Expert] | None = None
    architecture: str | None = None
    # ours (see the module docstring)
    seed: int = 0
    hidden_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    tied_embeddings: Literal["keep", "untie"] = "keep"

    def all_experts(self) -> list[tuple[str, Expert]]:
        """``(config key, expert)`` of every routed and shared expert."""
        out = [(f"experts[{i}]", e) for i, e in enumerate(self.experts)]
        out += [(f"shared_experts[{i}]", e) for i, e in enumerate(self.shared_experts or [])]
        return out

    def model_refs(self) -> list[tuple[str, str]]:
        """Every model folder the config names, with its key."""
        return [("base_model", self.base_model)] + [
            (f"{key}.source_model", e.source_model) for key, e in self.all_experts()]

    def to_yaml(self) -> str:
        data = self.model_dump(exclude_none=True)
        for key in ("seed", "hidden_dtype", "tied_embeddings"):
            if data.get(key) == MoEConfig.model_fields[key].default:
                data.pop(key)
        return yaml.safe_dump(data, sort_keys=False)


def _fail(key: str, message: str, source: str) -> ParameterError:
    return ParameterError(f"config key {key}: {message}", path=source)


def check_config(config: MoEConfig, source: str = "moe config") -> None:
    """mergekit's own refusals (``is_bad_config``) and ours, before any folder is opened."""
    if config.gate_mode not in GATE_MODES:
        raise _fail("gate_mode", f"unknown gate mode {config.gate_mode!r} (one of "
                    f"{', '.join(GATE_MODES)})", source)
    if not config.experts:
        raise _fail("experts", "at least one expert is needed", source)
    if config.experts_per_token < 1:
        raise _fail("experts_per_token", f"must be at least 1, got {config.experts_per_token}",
                    source)
    if config.experts_per_token > len(config.experts):
        raise _fail("experts_per_token", f"{config.experts_per_token} is more than the "
                    f"{len(config.experts)} expert(s)", source)
    if config.dtype is not None and config.dtype not in DTYPE_NAMES:
        raise _fail("dtype", f"unknown dtype {config.dtype!r} (one of {', '.join(DTYPE_NAMES)})",
                    source)
    for key, expert in config.all_experts():
        for field in ("noise_scale", "residual_scale"):
            value = getattr(expert, field)
            if value is not None and not (abs(value) < float("inf")):
                raise _fail(f"{key}.{field}", f"must be finite, got {value}", source)
        for field in ("positive_prompts", "negative_prompts"):
            for j, prompt in enumerate(getattr(expert, field) or []):
                if not prompt:
                    raise _fail(f"{key}.{field}[{j}]", "an empty prompt routes nothing", source)
    shared = config.shared_experts or []
    if config.gate_mode in PROMPT_MODES:
        for i, expert in enumerate(config.experts):
            if not expert.positive_prompts:
                raise _fail(f"experts[{i}].positive_prompts", f"gate_mode {config.gate_mode} "
                            "routes by prompts: every expert needs at least one", source)
        if shared and any(bool(e.positive_prompts) != bool(shared[0].positive_prompts) for e in shared):
            raise _fail("shared_experts", "give prompts for every shared expert or for none",
                        source)

        def prompts(e: Expert):
            return tuple(e.positive_prompts or ()), tuple(e.negative_prompts or ())

        if len(config.experts) > 1 and all(prompts(e) == prompts(config.experts[0])
                                           for e in config.experts[1:]):
            raise _fail("experts", "every expert has the same prompts: the gates could not "
                        "tell them apart", source)
    output_architecture(config, source)


def output_architecture(config: MoEConfig, source: str = "moe config") -> str:
    """mergekit's choice: ``architecture`` matched as a prefix of an output's name; with none,
    Mixtral when there are no shared experts, Qwen MoE with exactly one (the model types are
    checked against it once the folders are open)."""
    names = list(OUTPUT_ARCHITECTURES)
    if config.architecture:
        wanted = config.architecture.lower()
        if any(n.lower().startswith(wanted) for n in UNSUPPORTED_ARCHITECTURES):
            raise _fail("architecture", f"{config.architecture!r} is not written here (outputs: "
                        f"{', '.join(OUTPUT_ARCHITECTURES)})", source)
        names = [n for n in names if n.lower().startswith(wanted)]
        if not names:
            raise _fail("architecture", f"no output architecture {config.architecture!r} "
                        f"(outputs: {', '.join(OUTPUT_ARCHITECTURES)})", source)
    shared = len(config.shared_experts or [])
    if shared == 0 and "Mixtral" in names:
        return "Mixtral"
    if "Qwen MoE" in names:
        if shared != 1:
            raise _fail("shared_experts", f"a Qwen MoE output has exactly one shared expert, "
                        f"got {shared}", source)
        if config.gate_mode in PROMPT_MODES and not config.shared_experts[0].positive_prompts:
            raise _fail("shared_experts[0].positive_prompts", f"gate_mode {config.gate_mode} "
                        "needs prompts for the shared expert's gate", source)
        return "Qwen MoE"
    raise _fail("shared_experts", "a Mixtral output has no shared experts (a Qwen MoE output "
                "has one)", source)


def parse_moe_config(data: Any, *, source: str = "moe config") -> MoEConfig:
    if not isinstance(data, dict):
        raise ConfigError("an MoE config is a YAML mapping", path=source)
    try:
        config = MoEConfig.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"config key {'.'.join(str(x) for x in e['loc']) or 'config'}: "
                             f"{e['msg']}" for e in err.errors())
        raise ConfigError(f"invalid MoE config: {problems}", path=source) from None
    check_config(config, source)
    return config


def parse_moe_text(text: str | bytes, *, source: str = "moe config") -> MoEConfig:
    """A config from YAML text, read by the strict loader of ``engine.textparse``."""
    return parse_moe_config(parse_yaml(text, source=source), source=source)


def load_moe_config(path: str | Path) -> MoEConfig:
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_TEXT_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"cannot read MoE config: {err.strerror or err}", path=path) from None
    return parse_moe_text(raw, source=str(path))
