"""LaTen (Locate-then-Align, the Neural Incompatibility paper's PrePKT method):

- **locate** (``engine.transfer.locate``) on the teacher and on the student with the same
  example: the top ``N_LAYERS = L_S`` layers of each model by attribution, sorted by index and
  paired in that order; in each pair, the top ``floor(rate * ffn_S)`` FFN neurons and
  ``floor(rate * d_S)`` attention positions of each model, paired by rank;
- **extract** the teacher's up_proj rows and down_proj columns at its FFN neurons, its v_proj
  rows and o_proj columns at its attention positions (vectors of length d_T);
- **align**: one translator per module kind (up, down, v, o), shared across layers,
  ``f(x) = W2 relu(W1 x)`` (W1: d_T x d_T, W2: d_S x d_T, no biases, N(0, 1e-5) at start);
- **inject** ``W_S + Delta``, Delta zero except the student's located rows (up, v) or columns
  (down, o), which receive f(teacher vector);
- **train** one AdamW step per extract example (locate re-run on it): the LM loss of the
  student + Delta on 15 align examples and the extract example, micro-batch 1, accumulated,
  plus ``penalty * sum_m mean(f_m(knowledge)^2)`` (the size of what is injected); OneCycle
  cosine schedule, 10% warm-up, final_div_factor 1;
- at inference: one more train-split example located on both models, the translator of step
  ``checkpoint`` maps, and the result is written. No fine-tune follows.

The control (``laten_control``) runs the same pipeline with every teacher vector replaced by a
Gaussian vector of the same norm: what it reaches is what a 20-step hypernetwork fine-tune
does without the teacher's knowledge.
"""

from __future__ import annotations

import math
import random
from typing import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from engine.transfer.data import Encoded, collate, response_loss
from engine.transfer.locate import Located, locate, top_layers, top_units

KINDS = {"up": "mlp.up_proj", "down": "mlp.down_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"}
ROWS = {"up", "v"}  # kinds whose neuron vectors are rows (the others: columns)


class LaTenParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    n_extract: int = Field(20, ge=1, le=10_000, description="Extract examples: one optimiser step each (the paper: 20).")
    n_align: int = Field(80, ge=1, le=100_000, description="Align examples the batches draw from (the paper: 80).")
    align_per_step: int = Field(15, ge=0, le=4096, description="Align examples beside the extract example in each step (the paper: 15).")
    rate: float = Field(0.1, gt=0, le=1.0, description="Transfer rate: share of the student's FFN neurons and hidden units injected.")
    lr: float = Field(3e-4, gt=0, le=1.0, description="Peak learning rate (the paper's script: 3e-4).")
    weight_decay: float = Field(0.05, ge=0)
    penalty: float = Field(1000.0, ge=0, description="Weight of the size penalty on the injected vectors.")
    init_std: float = Field(1e-5, gt=0, description="Std of the translators' initial weights.")
    checkpoint: int = Field(1, ge=0, description="Optimiser steps of the translator used at inference "
                            "(the released inference script: after 1 step; 0: the untrained one).")


class Translator(nn.Module):
    """``f(x) = W2 relu(W1 x)`` applied to each row of x (n x d_in) -> n x d_out."""

    def __init__(self, d_in: int, d_out: int, std: float, generator: torch.Generator):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(d_in, d_in, generator=generator) * std)
        self.w2 = nn.Parameter(torch.randn(d_out, d_in, generator=generator) * std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.w1.mT) @ self.w2.mT


def n_units(student_cfg, rate: float) -> tuple[int, int]:
    """(FFN neurons, attention positions) injected per layer: floor(rate * ffn_S), floor(rate * d_S)."""
    return max(1, math.floor(rate * student_cfg.intermediate_size)), max(1, math.floor(rate * student_cfg.hidden_size))


def pair_sites(loc_t: Located, loc_s: Located, n_layers: int, n_ffn: int, n_attn: int) -> list[dict]:
    """Per paired layer: teacher and student layer, their FFN neurons and attention positions
    (each list best first, so entry k of the teacher's pairs with entry k of the student's)."""
    lt, ls = top_layers(loc_t.layer, n_layers), top_layers(loc_s.layer, n_layers)
    return [{"t": t, "s": s, "t_ffn": top_units(loc_t.ffn[t], n_ffn), "s_ffn": top_units(loc_s.ffn[s], n_ffn),
             "t_attn": top_units(loc_t.attn[t], n_attn), "s_attn": top_units(loc_s.attn[s], n_attn)}
            for t, s in zip(lt, ls)]


def knowledge(teacher_state: dict[str, torch.Tensor], sites: list[dict], *,
              random_like: torch.Generator | None = None) -> list[dict[str, torch.Tensor]]:
    """The teacher's neuron vectors at each pair's sites ({kind: n x d_T}); with
    ``random_like``, Gaussian vectors of the same norms instead (the control)."""
    out = []
    for site in sites:
        t = site["t"]
        w = {k: teacher_state[f"model.layers.{t}.{m}.weight"].float() for k, m in KINDS.items()}
        vecs = {"up": w["up"][site["t_ffn"]], "down": w["down"][:, site["t_ffn"]].mT,
                "v": w["v"][site["t_attn"]], "o": w["o"][:, site["t_attn"]].mT}
        if random_like is not None:
            for k, x in vecs.items():
                g = torch.randn(x.shape, generator=random_like).to(x)
                vecs[k] = g * (x.norm(dim=1, keepdim=True) / g.norm(dim=1, keepdim=True).clamp_min(1e-30))
        out.append({k: v.contiguous() for k, v in vecs.items()})
    return out


def deltas(translators: nn.ModuleDict, sites: list[dict], know: list[dict], student_shapes: dict
           ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({student weight name: Delta}, size penalty sum_m mean f_m(knowledge)^2)."""
    out, mapped = {}, {k: [] for k in KINDS}
    for site, vecs in zip(sites, know):
        for kind, module in KINDS.items():
            name = f"model.layers.{site['s']}.{module}.weight"
            y = translators[kind](vecs[kind])               # n x d_S
            mapped[kind].append(y)
            idx = site["s_ffn"] if kind in ("up", "down") else site["s_attn"]
            zero = torch.zeros(student_shapes[name], dtype=y.dtype, device=y.device)
            out[name] = zero.index_add(0, idx, y) if kind in ROWS else zero.index_add(1, idx, y.mT)
    penalty = sum(torch.cat(ys).pow(2).mean() for ys in mapped.values() if ys)
    return out, penalty


def _lm_loss(student, weights: dict, delta: dict, rows: list[Encoded], pad_id: int) -> torch.Tensor:
    device = next(student.parameters()).device
    ids, labels = collate(rows, pad_id)
    params = {n: weights[n] + d for n, d in delta.items()}
    return response_loss(_Call(student, params), ids.to(device), labels.to(device))


class _Call:
    """``student`` called with some weights replaced (``torch.func.functional_call``)."""

    def __init__(self, model, params):
        self.model, self.params = model, params

    def __call__(self, **kwargs):
        from torch.func import functional_call

        return functional_call(self.model, self.params, args=(), kwargs=kwargs)


def train(teacher, student, tokenizer, extract: list[tuple[str, str]], align: list[Encoded],
          encoded_extract: list[Encoded], params: LaTenParams, seed: int, *, control: bool,
          say: Callable[[str], None] = lambda m: None) -> tuple[nn.ModuleDict, list[float], dict]:
    """The translators after ``params.checkpoint`` steps (the run trains all ``n_extract``
    steps of the schedule and keeps that checkpoint), each step's loss, and a report."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    noise = torch.Generator().manual_seed(seed + 1) if control else None
    d_t, d_s = teacher.config.hidden_size, student.config.hidden_size
    device = next(student.parameters()).device
    translators = nn.ModuleDict({k: Translator(d_t, d_s, params.init_std, gen) for k in KINDS}).to(device)
    for p in student.parameters():
        p.requires_grad_(False)
    teacher_state = {k: v.detach() for k, v in teacher.state_dict().items()}
    weights = {k: v.detach() for k, v in student.state_dict().items()}
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    n_ffn, n_attn = n_units(student.config, params.rate)
    n_layers = student.config.num_hidden_layers
    steps = len(extract)
    opt = torch.optim.AdamW(translators.parameters(), lr=params.lr, weight_decay=params.weight_decay,
                            betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=params.lr, total_steps=max(2, steps),
                                                pct_start=0.1, anneal_strategy="cos", final_div_factor=1.0)
    kept = {k: v.detach().clone() for k, v in translators.state_dict().items()}  # step 0
    losses = []
    student.eval()
    for step, (example, enc) in enumerate(zip(extract, encoded_extract)):
        sites = pair_sites(locate(teacher, tokenizer, [example]), locate(student, tokenizer, [example]),
                           n_layers, n_ffn, n_attn)
        know = [{k: v.to(device) for k, v in kv.items()}
                for kv in knowledge(teacher_state, sites, random_like=noise)]
        for s in sites:
            s["s_ffn"], s["s_attn"] = s["s_ffn"].to(device), s["s_attn"].to(device)
        batch = rng.sample(align, min(params.align_per_step, len(align))) + [enc]
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for row in batch:  # micro-batch 1, gradients accumulated
            delta, penalty = deltas(translators, sites, know, shapes)
            loss = (_lm_loss(student, weights, delta, [row], tokenizer.pad_token_id)
                    + params.penalty * penalty) / len(batch)
            loss.backward()
            total += float(loss.detach())
        opt.step()
        sched.step()
        losses.append(total)
        if step + 1 == params.checkpoint:
            kept = {k: v.detach().clone() for k, v in translators.state_dict().items()}
        say(f"align step {step + 1}/{steps} loss {total:.4f}")
    if params.checkpoint > steps:
        kept = {k: v.detach().clone() for k, v in translators.state_dict().items()}
    translators.load_state_dict(kept)
    return translators, losses, {"n_ffn": n_ffn, "n_attn": n_attn, "steps": steps,
                                 "checkpoint": min(params.checkpoint, steps)}


@torch.no_grad()
def inject(teacher, student, tokenizer, translators: nn.ModuleDict, example: tuple[str, str],
           params: LaTenParams, *, control: bool, seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    """The student's state with Delta added, located on ``example``; and the sites used."""
    n_ffn, n_attn = n_units(student.config, params.rate)
    sites = pair_sites(locate(teacher, tokenizer, [example]), locate(student, tokenizer, [example]),
                       student.config.num_hidden_layers, n_ffn, n_attn)
    device = next(student.parameters()).device
    noise = torch.Generator().manual_seed(seed + 2) if control else None
    know = [{k: v.to(device) for k, v in kv.items()}
            for kv in knowledge({k: v for k, v in teacher.state_dict().items()}, sites, random_like=noise)]
    for s in sites:
        s["s_ffn"], s["s_attn"] = s["s_ffn"].to(device), s["s_attn"].to(device)
    state = {k: v.detach().clone() for k, v in student.state_dict().items()}
    delta, _ = deltas(translators, sites, know, {k: tuple(v.shape) for k, v in state.items()})
    for name, d in delta.items():
        state[name] = state[name] + d.to(state[name].dtype)
    pairs = [{"teacher_layer": s["t"], "student_layer": s["s"]} for s in sites]
    return state, {"pairs": pairs, "delta_norm": float(sum(d.pow(2).sum() for d in delta.values()) ** 0.5)}
