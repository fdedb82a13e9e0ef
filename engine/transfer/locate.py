"""LaTen's locate step: layers, FFN neurons and attention positions scored by how much each
raises the log-probability of the answer's last token (after Yu & Ananiadou's
log-probability-increase attribution, as the Neural Incompatibility code applies it).

For one example (prompt, answer; trailing punctuation and whitespace stripped from the answer)
the target token t is the last token of prompt + answer and the input is everything before it.
At the last position, with ``sigma`` the standard deviation of the last decoder layer's output
there and ``g`` the final norm's weight:

    lp(h) = log_softmax(lm_head(g * h / sigma))[t]

- attention of layer i: ``lp(h_in + attn_out) - lp(h_in)``; FFN: ``lp(h_mid + ffn_out) -
  lp(h_mid)`` with ``h_mid = h_in + attn_out``;
- FFN neuron k: its sub-value ``m_k down[:, k]`` (m = act(gate) * up), scored
  ``lp(h_mid + sub-value) - lp(h_mid)``;
- attention position p (a (head, dim) entry of o_proj's input z): ``z_p o_proj[:, p]``, scored
  the same way from ``h_in``.
Scores are summed over the examples given.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import torch

STRIP = string.punctuation + string.whitespace


@dataclass
class Located:
    layer_attn: torch.Tensor        # (layers,)
    layer_ffn: torch.Tensor         # (layers,)
    ffn: torch.Tensor               # (layers, intermediate)
    attn: torch.Tensor              # (layers, heads * head_dim)

    @property
    def layer(self) -> torch.Tensor:
        return self.layer_attn + self.layer_ffn


def target_ids(tokenizer, example: tuple[str, str]) -> tuple[list[int], int]:
    """(input ids, target token): prompt + stripped answer, its last token the target."""
    prompt, answer = example
    text = prompt + answer.rstrip(STRIP)
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if len(ids) < 2:
        raise ValueError("an example of under two tokens has nothing to attribute")
    return ids[:-1], ids[-1]


def _lp(h: torch.Tensor, norm_w: torch.Tensor, head: torch.Tensor, sigma: torch.Tensor, t: int):
    """lp of each row of h (n x d)."""
    logits = (h * norm_w / sigma) @ head.mT
    return torch.log_softmax(logits.double(), dim=-1)[..., t]


@torch.no_grad()
def locate(model, tokenizer, examples: list[tuple[str, str]]) -> Located:
    layers = model.model.layers
    n = len(layers)
    cfg = model.config
    width_z = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    out = Located(torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64),
                  torch.zeros(n, cfg.intermediate_size, dtype=torch.float64),
                  torch.zeros(n, width_z, dtype=torch.float64))
    device = next(model.parameters()).device
    norm_w = model.model.norm.weight.float()
    head = model.lm_head.weight.float()
    for example in examples:
        ids, t = target_ids(tokenizer, example)
        seen: dict = {}
        hooks = []
        for i, layer in enumerate(layers):
            hooks.append(layer.register_forward_pre_hook(
                lambda m, args, kw, i=i: seen.__setitem__(("in", i), (args[0] if args else kw["hidden_states"])[0, -1].float()),
                with_kwargs=True))
            hooks.append(layer.self_attn.o_proj.register_forward_hook(
                lambda m, a, o, i=i: seen.update({("z", i): a[0][0, -1].float(), ("attn", i): o[0, -1].float()})))
            hooks.append(layer.mlp.down_proj.register_forward_hook(
                lambda m, a, o, i=i: seen.update({("m", i): a[0][0, -1].float(), ("ffn", i): o[0, -1].float()})))
        hooks.append(layers[-1].register_forward_hook(
            lambda m, a, o: seen.__setitem__("last", (o[0] if isinstance(o, tuple) else o)[0, -1].float())))
        try:
            model(input_ids=torch.tensor([ids], device=device), use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        sigma = seen["last"].std()
        for i, layer in enumerate(layers):
            h_in, attn = seen[("in", i)], seen[("attn", i)]
            h_mid = h_in + attn
            base_in, base_mid = _lp(h_in, norm_w, head, sigma, t), _lp(h_mid, norm_w, head, sigma, t)
            out.layer_attn[i] += float(_lp(h_mid, norm_w, head, sigma, t) - base_in)
            out.layer_ffn[i] += float(_lp(h_mid + seen[("ffn", i)], norm_w, head, sigma, t) - base_mid)
            down = layer.mlp.down_proj.weight.float()          # d x ffn
            sub = seen[("m", i)][:, None] * down.mT             # ffn x d: m_k down[:, k]
            out.ffn[i] += (_lp(h_mid + sub, norm_w, head, sigma, t) - base_mid).cpu()
            o_w = layer.self_attn.o_proj.weight.float()         # d x z
            sub = seen[("z", i)][:, None] * o_w.mT               # z x d
            out.attn[i] += (_lp(h_in + sub, norm_w, head, sigma, t) - base_in).cpu()
    return out


def top_layers(scores: torch.Tensor, n_keep: int) -> list[int]:
    """The ``n_keep`` highest-scoring layers, sorted by index."""
    n_keep = min(n_keep, scores.numel())
    return sorted(torch.topk(scores, n_keep).indices.tolist())


def top_units(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` highest-scoring units, best first (the pairing order)."""
    return torch.topk(scores, min(count, scores.numel())).indices
