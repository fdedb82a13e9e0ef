"""PostPKT after Zhong et al., "Seeking Neural Nuggets: Knowledge Transfer in Large Language
Models from a Parametric Perspective" (ICLR 2024), as the Neural Incompatibility paper runs it:

1. sensitivity ``S = sum over seed samples |theta * grad theta L|`` of the teacher (the larger
   fine-tune), the loss on the response tokens, one backward pass per sample;
2. the teacher's top ``L_S`` layers by summed sensitivity, re-sorted by index: the k-th kept
   layer gives the student's layer k;
3. per matrix (q k v o gate up down of each kept layer, the input embedding taken transposed,
   the LM head), the contiguous submatrix of the student's shape with the largest summed
   sensitivity (exhaustive 2-D window over a summed-area table);
4. its rank-r SVD ``U_r S_r V_r^T``: LoRA ``B = U_r S_r``, ``A = V_r^T``;
5. PiSSA-style injection: the student's weight becomes ``W - s B A`` and the LoRA (B, A) is
   attached with ``s = alpha / r``, so the starting model equals the student exactly;
6. the LoRA fine-tune on the task (``finetune``).

The control (``postpkt_control``) is the same fine-tune from peft's random LoRA initialisation
(A Kaiming-uniform, B = 0). ``extract_from="task_vector"`` (ours, labelled) extracts from the
teacher's task vector (fine-tune minus its base) instead of its weights.
"""

from __future__ import annotations

import math
import random
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from engine.transfer.data import Encoded, collate, response_loss
from engine.transfer.lora import attach, random_init

MATRICES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
EMBED, HEAD = "model.embed_tokens", "lm_head"


class PostPKTParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    n_seed: int = Field(32, ge=1, le=4096, description="Seed samples whose gradients give the sensitivity.")
    rank: int = Field(16, ge=1, le=1024, description="LoRA rank r (the paper: 16).")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the scale is alpha / r (the paper: 16/16).")
    n_train: int = Field(1000, ge=1, le=100_000, description="Task examples of the fine-tune (the paper: 1,000).")
    epochs: int = Field(3, ge=1, le=100, description="Epochs over them (the paper: 3).")
    lr: float = Field(3e-4, gt=0, le=1.0, description="Peak learning rate (the paper: 3e-4).")
    batch_size: int = Field(64, ge=1, le=4096, description="Examples per optimiser step (the paper: 64).")
    micro_batch: int = Field(8, ge=1, le=4096, description="Gradient-accumulation micro-batch (the paper: 8).")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Linear warm-up share of the steps, then linear decay.")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout (the paper: 0.05).")
    extract_from: Literal["weights", "task_vector", "student"] = Field(
        "weights", description="weights: the paper; task_vector: ours, the teacher's fine-tune minus "
        "its base; student: ours, PiSSA's start from the student's own top-r components (no teacher), "
        "which separates the teacher's knowledge from a better-conditioned start.")
    curve_steps: list[int] = Field([0, 10, 25, 50, 100, 200], description="Fine-tune steps at which the "
                                   "task accuracy is measured (those within the run).")


def total_steps(p: PostPKTParams) -> int:
    return p.epochs * math.ceil(p.n_train / p.batch_size)


# --------------------------------------------------------------------------- 1. sensitivity
def sensitivity(model, samples: list[Encoded], pad_id: int,
                say: Callable[[str], None] = lambda m: None) -> dict[str, torch.Tensor]:
    """``sum_samples |theta * dL/dtheta|`` for every parameter (float32, on the model's device)."""
    device = next(model.parameters()).device
    scores = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in model.named_parameters()}
    model.eval()
    for i, sample in enumerate(samples):
        ids, labels = collate([sample], pad_id)
        model.zero_grad(set_to_none=True)
        response_loss(model, ids.to(device), labels.to(device)).backward()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.grad is not None:
                    scores[n] += (p.detach().float() * p.grad.float()).abs()
        say(f"sensitivity {i + 1}/{len(samples)}")
    model.zero_grad(set_to_none=True)
    return scores


# --------------------------------------------------------------------------- 2. layers
def select_layers(scores: dict[str, torch.Tensor], n_teacher: int, n_keep: int) -> list[int]:
    """The ``n_keep`` teacher layers of largest summed sensitivity, sorted by index."""
    totals = [sum(float(t.sum()) for n, t in scores.items() if n.startswith(f"model.layers.{i}."))
              for i in range(n_teacher)]
    if n_keep >= n_teacher:
        return list(range(n_teacher))
    top = sorted(range(n_teacher), key=lambda i: -totals[i])[:n_keep]
    return sorted(top)


# --------------------------------------------------------------------------- 3. window
def best_window(scores: torch.Tensor, rows: int, cols: int) -> tuple[int, int]:
    """Top-left corner of the ``rows x cols`` contiguous block with the largest sum (every
    offset tried, through a summed-area table; ties: the first in row-major order)."""
    big_r, big_c = scores.shape
    if rows > big_r or cols > big_c:
        raise ValueError(f"window {rows}x{cols} larger than the matrix {big_r}x{big_c}")
    sat = torch.zeros(big_r + 1, big_c + 1, dtype=torch.float64, device=scores.device)
    sat[1:, 1:] = scores.double().cumsum(0).cumsum(1)
    sums = sat[rows:, cols:] - sat[:-rows, cols:] - sat[rows:, :-cols] + sat[:-rows, :-cols]
    flat = int(torch.argmax(sums))
    return flat // sums.shape[1], flat % sums.shape[1]


# --------------------------------------------------------------------------- 4. SVD
def low_rank(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``B A`` the best rank-``rank`` approximation: B = U_r S_r, A = V_r^T."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    r = min(rank, s.numel())
    return vh[:r].float(), (u[:, :r] * s[:r]).float()


def module_pairs(layers_kept: list[int]) -> list[tuple[str, str]]:
    """(teacher module, student module): the k-th kept teacher layer into student layer k,
    then the embedding and the head."""
    pairs = [(f"model.layers.{t}.{m}", f"model.layers.{s}.{m}")
             for s, t in enumerate(layers_kept) for m in MATRICES]
    return pairs + [(EMBED, EMBED), (HEAD, HEAD)]


def extracted_factors(teacher_state: dict[str, torch.Tensor], scores: dict[str, torch.Tensor],
                      student_state: dict[str, torch.Tensor], layers_kept: list[int], rank: int
                      ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict]:
    """Per student module, the LoRA factors (A, B) cut from the teacher, and where each cut
    came from (``{student module: {"from", "row", "col"}}``)."""
    factors, where = {}, {}
    for t_mod, s_mod in module_pairs(layers_kept):
        t_w, sens = teacher_state[f"{t_mod}.weight"], scores[f"{t_mod}.weight"]
        s_w = student_state[f"{s_mod}.weight"]
        if s_mod == EMBED:  # the embedding is taken transposed: hidden x vocab
            t_w, sens, s_w = t_w.mT, sens.mT, s_w.mT
        row, col = best_window(sens, *s_w.shape)
        cut = t_w[row:row + s_w.shape[0], col:col + s_w.shape[1]]
        factors[s_mod] = low_rank(cut.float(), rank)
        where[s_mod] = {"from": t_mod, "row": row, "col": col}
    return factors, where


def random_factors(student_state: dict[str, torch.Tensor], n_layers: int, rank: int,
                   generator: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for _, s_mod in module_pairs(list(range(n_layers))):
        w = student_state[f"{s_mod}.weight"]
        if s_mod == EMBED:
            w = w.mT
        out[s_mod] = random_init(w.shape[0], w.shape[1], rank, generator)
    return out


# --------------------------------------------------------------------------- 5. injection
@torch.no_grad()
def inject_pissa(model, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float) -> None:
    """``W <- W - s B A`` for every module of ``factors`` (before ``attach``), so the model
    with the LoRA attached is the model as it was."""
    for name, (a, b) in factors.items():
        weight = model.get_submodule(name).weight
        delta = scale * (b.to(weight.device) @ a.to(weight.device))
        weight.sub_(delta.mT if name == EMBED else delta)


# --------------------------------------------------------------------------- 6. fine-tune
def lr_at(step: int, total: int, peak: float, warmup_ratio: float) -> float:
    """Linear warm-up over ``ceil(ratio * total)`` steps, then linear decay to 0 (the HF
    Trainer's default schedule the paper's fine-tune uses)."""
    warm = math.ceil(warmup_ratio * total)
    if step < warm:
        return peak * (step + 1) / warm
    return peak * max(0.0, (total - step) / max(1, total - warm))


def finetune(model, trainable: list[torch.nn.Parameter], train_set: list[Encoded], pad_id: int,
             params: PostPKTParams, seed: int, *, on_eval: Callable[[int], None] | None = None,
             say: Callable[[str], None] = lambda m: None) -> list[float]:
    """AdamW over ``trainable`` (the LoRA factors, or every weight for a plain fine-tune):
    ``epochs`` shuffled passes, ``batch_size`` examples a step accumulated in micro-batches,
    gradient norm clipped at 1. ``on_eval(step)`` at every curve step within the run (step 0:
    before any update). Returns each step's loss."""
    device = next(model.parameters()).device
    rng = random.Random(seed)
    torch.manual_seed(seed)
    steps = total_steps(params)
    curve = sorted({s for s in params.curve_steps if 0 <= s <= steps})
    optimizer = torch.optim.AdamW(trainable, lr=params.lr, weight_decay=0.0)
    losses, step = [], 0
    if on_eval is not None and 0 in curve:
        on_eval(0)
    model.train()
    for _ in range(params.epochs):
        order = list(range(len(train_set)))
        rng.shuffle(order)
        for start in range(0, len(order), params.batch_size):
            batch = [train_set[i] for i in order[start:start + params.batch_size]]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, steps, params.lr, params.warmup_ratio)
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            micro = [batch[i:i + params.micro_batch] for i in range(0, len(batch), params.micro_batch)]
            for part in micro:
                ids, labels = collate(part, pad_id)
                loss = response_loss(model, ids.to(device), labels.to(device)) / len(micro)
                loss.backward()
                total += float(loss.detach())
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            losses.append(total)
            step += 1
            say(f"fine-tune step {step}/{steps} loss {total:.3f}")
            if on_eval is not None and step in curve:
                on_eval(step)
                model.train()
    model.eval()
    return losses


def prepare_student(student, teacher_state, scores, layers_kept, params: PostPKTParams,
                    control: bool, seed: int, teacher_base_state=None) -> tuple[list, dict]:
    """Attach the LoRA to ``student`` in place (extracted and PiSSA-injected, or the control's
    random one); returns the trainable factors and the extraction report."""
    student_state = {k: v.detach().float().cpu() for k, v in student.state_dict().items()}
    scale = params.alpha / params.rank
    n_layers = student.config.num_hidden_layers
    if control:
        factors = random_factors(student_state, n_layers, params.rank,
                                 torch.Generator().manual_seed(seed))
        report = {"init": "random (A Kaiming-uniform, B = 0)"}
    else:
        source = teacher_state
        if params.extract_from == "student":
            factors = {}
            for _, s_mod in module_pairs(list(range(n_layers))):
                w = student_state[f"{s_mod}.weight"]
                factors[s_mod] = low_rank(w.mT if s_mod == EMBED else w, params.rank)
            inject_pissa(student, factors, scale)
            report = {"init": "the student's own top-r components (PiSSA)"}
            trainable = attach(student, factors, scale, params.dropout)
            report["initial_factors"] = {name: (a.clone(), b.clone()) for name, (a, b) in factors.items()}
            return trainable, report
        if params.extract_from == "task_vector":
            source = {k: teacher_state[k] - teacher_base_state[k] for k in teacher_state}
        factors, where = extracted_factors(source, scores, student_state, layers_kept, params.rank)
        inject_pissa(student, factors, scale)
        report = {"init": f"extracted from the teacher's {params.extract_from.replace('_', ' ')}",
                  "teacher_layers": layers_kept, "cuts": where}
    trainable = attach(student, factors, scale, params.dropout)
    report["initial_factors"] = {name: (a.clone(), b.clone()) for name, (a, b) in factors.items()}
    return trainable, report
