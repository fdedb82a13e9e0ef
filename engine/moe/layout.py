"""The output of an MoE assembly: its config.json and its tensors, each with where it comes from.

Mixtral (Llama or Mistral experts) and Qwen2-MoE (Llama, Mistral or Qwen2 experts, one shared
expert) in transformers 5's own layout, the one ``save_pretrained`` writes and mergekit 0.1.5
writes for Mixtral: per layer, ``mlp.experts.gate_up_proj`` of shape (experts, 2 x intermediate,
hidden) holds each expert's ``gate_proj`` rows then its ``up_proj`` rows, and
``mlp.experts.down_proj`` (experts, hidden, intermediate) its ``down_proj``; the router is
``mlp.gate.weight`` (experts, hidden). Qwen2-MoE adds ``mlp.shared_expert.*_proj.weight`` (the
shared expert's dense MLP) and ``mlp.shared_expert_gate.weight`` (1, hidden), and has q/k/v
biases: a base without them gets zeros, as mergekit writes (the same function).

Everything outside the MLPs comes from the base. The config is the base's, through
transformers' own config class of the output (as mergekit does), with mergekit's settings:
Mixtral without sliding window; Qwen2-MoE with every layer sparse, ``norm_topk_prob``, and
the experts' and shared expert's intermediate sizes the base's.

Before any tensor is read, the planned names and shapes are compared with an empty model of
the output config built on the meta device: the output is exactly what transformers loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from engine.errors import IncompatibleModelsError

MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
SOURCE_TYPES = {"Mixtral": ("llama", "mistral"), "Qwen MoE": ("llama", "mistral", "qwen2")}
_DROP = ("architectures", "model_type", "transformers_version", "auto_map", "torch_dtype", "dtype",
         "_name_or_path")


@dataclass(frozen=True)
class Piece:
    """One output tensor: ``kind`` says how it is made (``copy`` from the base, ``experts_gate_up``,
    ``experts_down``, ``shared`` from the shared expert, ``router``, ``shared_router``, ``zeros``)."""

    name: str
    shape: tuple[int, ...]
    kind: str
    layer: int | None = None
    source: str | None = None    # the tensor read (copy, shared)


def mlp_name(layer: int, projection: str) -> str:
    return f"model.layers.{layer}.mlp.{projection}.weight"


def output_config(architecture: str, base_config: dict, *, num_experts: int, experts_per_token: int,
                  dtype: torch.dtype, tied: bool) -> dict:
    """config.json of the output (transformers' config class fills its defaults)."""
    import transformers

    fields = {k: v for k, v in base_config.items() if k not in _DROP}
    fields["tie_word_embeddings"] = tied
    if architecture == "Mixtral":
        fields.update(num_local_experts=num_experts, num_experts_per_tok=experts_per_token,
                      sliding_window=None)
        cfg = transformers.MixtralConfig(**fields)
        cfg.architectures = ["MixtralForCausalLM"]
    else:
        inter = fields.get("intermediate_size")
        fields.update(num_experts=num_experts, num_experts_per_tok=experts_per_token,
                      decoder_sparse_step=1, norm_topk_prob=True, sliding_window=None,
                      use_sliding_window=False, shared_expert_intermediate_size=inter,
                      moe_intermediate_size=inter, mlp_only_layers=[])
        fields.pop("layer_types", None)  # rebuilt by the class for use_sliding_window=False
        cfg = transformers.Qwen2MoeConfig(**fields)
        cfg.architectures = ["Qwen2MoeForCausalLM"]
    cfg.dtype = dtype
    out = json.loads(cfg.to_json_string(use_diff=False))
    out.pop("transformers_version", None)
    return out


def expected_tensors(config: dict) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of an empty model of ``config`` built on the meta device (a tied head
    left out, as save_pretrained leaves it out)."""
    from engine.evaluate.loading import model_from_config

    with torch.device("meta"):
        model = model_from_config(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        shapes.pop("lm_head.weight", None)
    return shapes


def plan_pieces(architecture: str, base, *, num_layers: int, num_experts: int, hidden: int,
                intermediate: int, write_head: bool, config: dict) -> list[Piece]:
    """Every output tensor in the base's order (a layer's MoE tensors where its MLP was)."""
    pieces: list[Piece] = []
    done_layers: set[int] = set()
    qwen = architecture == "Qwen MoE"

    def moe_layer(layer: int) -> list[Piece]:
        prefix = f"model.layers.{layer}.mlp"
        out = [Piece(f"{prefix}.experts.gate_up_proj", (num_experts, 2 * intermediate, hidden),
                     "experts_gate_up", layer),
               Piece(f"{prefix}.experts.down_proj", (num_experts, hidden, intermediate),
                     "experts_down", layer),
               Piece(f"{prefix}.gate.weight", (num_experts, hidden), "router", layer)]
        if qwen:
            out += [Piece(f"{prefix}.shared_expert.{p}.weight", tuple(base.info(mlp_name(layer, p)).shape),
                          "shared", layer, mlp_name(layer, p)) for p in MLP_PROJECTIONS]
            out.append(Piece(f"{prefix}.shared_expert_gate.weight", (1, hidden), "shared_router", layer))
        return out

    for name in base.tensor_names:
        parts = name.split(".")
        if ".mlp." in name and len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit():
            layer = int(parts[2])
            if layer not in done_layers:
                done_layers.add(layer)
                pieces += moe_layer(layer)
            continue
        if name == "lm_head.weight" and not write_head:
            continue
        pieces.append(Piece(name, tuple(base.info(name).shape), "copy", source=name))
    if write_head and "lm_head.weight" not in base:
        embed = "model.embed_tokens.weight"
        pieces.append(Piece("lm_head.weight", tuple(base.info(embed).shape), "copy", source=embed))
    if qwen:  # Qwen2-MoE's attention has q/k/v biases; a base without them gets zeros
        have = {p.name for p in pieces}
        heads = config["num_attention_heads"]
        kv = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or hidden // heads
        for layer in range(num_layers):
            for proj, n in (("q_proj", heads), ("k_proj", kv), ("v_proj", kv)):
                bias = f"model.layers.{layer}.self_attn.{proj}.bias"
                if bias not in have:
                    pieces.append(Piece(bias, (n * head_dim,), "zeros", layer))
    return pieces


def check_against_transformers(pieces: list[Piece], config: dict, base_path) -> None:
    """Refuse a plan that transformers would not load exactly (missing, extra or reshaped
    tensors), listing every difference at once."""
    expected = expected_tensors(config)
    planned = {p.name: p.shape for p in pieces}
    reasons = [f"tensor {n!r} is not in the output architecture" for n in planned if n not in expected]
    reasons += [f"tensor {n!r} of the output architecture has no source" for n in expected if n not in planned]
    reasons += [f"tensor {n!r}: shape {list(planned[n])}, the output architecture's is "
                f"{list(expected[n])}" for n in planned if n in expected and expected[n] != planned[n]]
    if reasons:
        raise IncompatibleModelsError(
            f"config key base_model: the base cannot become a {config.get('architectures', ['MoE'])[0]}: "
            + "; ".join(reasons[:8]) + (f"; and {len(reasons) - 8} more" if len(reasons) > 8 else ""),
            reasons=reasons, path=base_path)
