"""BitDelta: the delta as a sign matrix times one scale, ``d ~ alpha * sign(d)``.

BitDelta (Liu et al.) stores 1 bit per entry plus one fp16 scale per matrix
(``alpha = mean |d|``, the L2-optimal scale for a sign matrix), 16x against fp16. Its second
stage, scale distillation, is part of the method whose results the paper reports, so it is the
default here (``distill: true``; ``false`` = stage 1 only). The default ``objective:
logit_mse`` is the authors' recipe (``FasterDecoding/BitDelta``, ``bitdelta/train.py`` and
``scripts/train_example.bash``): the MSE between the rebuilt and the fine-tuned model's logits
on generic text, 200 steps of 4 rows of 128 tokens, AdamW at lr 1e-4 cosine-annealed to 0
(``engine.compress.calibration.distill_logit_mse``). Generic text, our adaptation: the dev
split of ``calibration_data`` (the user's JSONL file), else the zoo bases' pretraining text
(a fine-tune in no zoo is distilled on it too, with a warning in the manifest and the
report). ``objective: task_kl`` is ours (the measured ``small-models`` preset): KL to the
fine-tune's next-token distributions at the answer positions of ``n_prompts`` prompts of its
zoo task (or of ``calibration_data``), Adam at a constant lr. The authors' script also leaves
the uncompressed parameters (embeddings, norms, head) trainable during distillation; the paper
distils the scales only, and so do we.

Other ratios (our extension, reported as such): ``planes`` sign planes fitted greedily to the
residual (``r <- r - alpha_j sign(r)``, the usual multi-bit binarisation), so 2 planes are 8x,
4 planes 4x. With ``--ratio`` the planes are uniform when that lands within the tolerance
(1 plane at 16x: BitDelta proper); otherwise a first streaming pass measures each extra
plane's error reduction and planes go, greedily by reduction per byte, to the tensors that
gain most (so at 32x roughly half the matrices keep one plane and the rest none).

Section: u8 plane count, fp16 scale per plane, then each plane's packed signs (1 = positive).
"""

from __future__ import annotations

import heapq

import numpy as np
import torch
from typing import Literal

from pydantic import Field

from engine.compress import bits
from engine.compress.registry import CompressParams
from engine.errors import ArtifactError, ParameterError

NAME = "bitdelta"
PAPER = ("Liu et al., BitDelta: Your Fine-Tune May Only Be Worth One Bit, NeurIPS 2024 "
         "(arXiv:2402.10193)")
SOLVED = ("planes",)
MAX_PLANES = 8
UNIFORM_TOLERANCE = 0.08


# Parameter sets measured in bench/README.md: our task-data KL distillation of the scales.
PRESETS = {"small-models": {"objective": "task_kl", "steps": 100, "lr": 1e-3}}


class Params(CompressParams):
    planes: int | None = Field(None, ge=1, le=MAX_PLANES,
                               description="Sign planes per matrix (1 = BitDelta; solved from --ratio).")
    distill: bool = Field(True, description="Distil the scales (BitDelta stage 2, the paper's "
                                            "results); false: stage 1 only (scale = mean |d|).")
    objective: Literal["logit_mse", "task_kl"] = Field(
        "logit_mse", description="logit_mse: the authors' recipe (logit MSE on generic text: the "
                                 "calibration_data file, else the zoo's pretraining text; AdamW, "
                                 "cosine lr); task_kl (ours): KL at the answer positions of "
                                 "n_prompts task prompts, Adam at a constant lr.")
    tasks: list[str] | None = Field(None, description="task_kl: calibration tasks (default: the "
                                                      "fine-tune's zoo task).")
    calibration_data: str | None = Field(None, description="A JSONL file of {prompt, answer} lines: "
                                                           "distil on its dev split (logit_mse: "
                                                           "as generic text) instead.")
    n_prompts: int = Field(32, ge=1, le=4096, description="task_kl: calibration prompts (one batch).")
    batch_size: int = Field(4, ge=1, le=1024, description="logit_mse: rows per step (authors: 4).")
    seq_len: int = Field(128, ge=8, le=8192, description="logit_mse: tokens per row (authors: 128).")
    steps: int = Field(200, ge=1, le=10000, description="Distillation steps (authors: 200; the "
                                                       "task_kl preset: 100).")
    lr: float = Field(1e-4, gt=0, description="Learning rate of the scales (authors: 1e-4, the "
                                              "peak of the cosine; task_kl preset: 1e-3).")

    def calibration_text(self) -> str:
        """What the pipeline prepares: generic text or task prompts."""
        return "generic" if self.objective == "logit_mse" else "tasks"

    def examples_wanted(self) -> int | None:
        """How many file examples one pass wants (None: rows are packed and cycled)."""
        return self.n_prompts if self.objective == "task_kl" else None


def _planes(delta: torch.Tensor, k: int) -> tuple[list[torch.Tensor], list[float]]:
    """k sign planes (bool, True = +) and their fp16-exact scales, fitted to the residual."""
    residual = delta.reshape(-1).to(torch.float32).clone()
    signs, scales = [], []
    for _ in range(k):
        positive = residual >= 0
        alpha = float(torch.tensor(float(residual.abs().mean())).to(torch.float16))
        residual -= torch.where(positive, alpha, -alpha)
        signs.append(positive)
        scales.append(alpha)
    return signs, scales


def plane_bytes(numel: int) -> int:
    return (numel + 7) // 8 + 2


def encode(delta: torch.Tensor, budget: int | None, params: Params, ctx) -> bytes:
    k = params.planes if budget is None else int(ctx.setting if ctx.setting is not None else
                                                 max(0, (budget - 1) // plane_bytes(delta.numel())))
    if k == 0:
        return b""
    signs, scales = _planes(delta, k)
    ctx.info.update(planes=k)
    out = bits.SectionWriter()
    out.uint(k, 1)
    out.f16(scales)
    for plane in signs:
        out.raw(bits.pack_bits(plane.cpu().numpy()))
    return out.getvalue()


def read_planes(reader: bits.SectionReader, numel: int) -> tuple[np.ndarray, list[np.ndarray]]:
    k = reader.uint(1)
    if not 1 <= k <= MAX_PLANES:
        raise ArtifactError(f"{reader.what}: plane count {k} outside 1..{MAX_PLANES}")
    scales = reader.f16(k)
    planes = [reader.bits(numel) for _ in range(k)]
    reader.done()
    return scales, planes


def decode(reader: bits.SectionReader, shape, params: Params, ctx) -> torch.Tensor:
    numel = int(np.prod(shape))
    scales, planes = read_planes(reader, numel)
    out = torch.zeros(numel, dtype=torch.float32)
    for alpha, plane in zip(scales, planes):
        sign = torch.from_numpy(plane.astype(np.float32) * 2.0 - 1.0)
        out += float(alpha) * sign
    return out.reshape(tuple(shape)).to(ctx.device)


# ---------------------------------------------------------------- budget across tensors
def needs_prepass(params: Params) -> bool:
    return True


def prepass(delta: torch.Tensor, params: Params, ctx) -> dict:
    """Error reduction of each successive plane (exact, on the residual)."""
    residual = delta.reshape(-1).to(torch.float32).clone()
    gains = []
    for _ in range(MAX_PLANES):
        alpha = float(residual.abs().mean())
        before = float((residual ** 2).sum())
        residual -= alpha * torch.where(residual >= 0, 1.0, -1.0)
        gains.append(before - float((residual ** 2).sum()))
    return {"numel": delta.numel(), "gains": gains}


def allocate(stats: list[dict], budgets: list[int], params: Params) -> list[int]:
    """Planes per tensor: uniform if that fits the total within the tolerance, else greedy."""
    total = sum(budgets)
    costs = [plane_bytes(s["numel"]) for s in stats]

    def used(planes: list[int]) -> int:
        return sum(1 + p * c if p else 0 for p, c in zip(planes, costs))

    for k in range(MAX_PLANES, 0, -1):
        uniform = [k] * len(stats)
        if used(uniform) <= total * (1 + UNIFORM_TOLERANCE):
            if used(uniform) >= total * (1 - UNIFORM_TOLERANCE) or k == MAX_PLANES:
                return uniform
            break
    planes = [0] * len(stats)
    spent = 0
    heap = [(-s["gains"][0] / (costs[i] + 1), i) for i, s in enumerate(stats)]
    heapq.heapify(heap)
    skipped = []
    while heap:
        _, i = heapq.heappop(heap)
        extra = costs[i] + (1 if planes[i] == 0 else 0)
        if spent + extra > total:
            skipped.append((extra, i))
            continue
        planes[i] += 1
        spent += extra
        if planes[i] < MAX_PLANES:
            heapq.heappush(heap, (-stats[i]["gains"][planes[i]] / costs[i], i))
    # One more plane if that lands closer to the budget than stopping short of it.
    if skipped:
        extra, i = min(skipped)
        if spent + extra - total < total - spent and planes[i] < MAX_PLANES:
            planes[i] += 1
    return planes


# ---------------------------------------------------------------- scale distillation
def learns(params: Params) -> bool:
    """Whether ``calibrate`` runs: stage 2 (scale distillation) unless ``distill: false``."""
    return params.distill is not False


def calibrate(job, params: Params) -> dict:
    if not params.distill:
        return {}
    from engine.compress.calibration import distill, distill_logit_mse

    tensors = {}  # name -> (section index, scales parameter, stacked signs)
    for i, name in enumerate(job.matrices):
        data = job.section(i)
        if not data:
            continue
        shape = job.base[name].shape
        scales, planes = read_planes(bits.SectionReader(data, f"section of {name}"), job.base[name].numel())
        signs = torch.stack([torch.from_numpy(p.astype(np.float32) * 2 - 1) for p in planes])
        tensors[name] = (i, torch.tensor(scales, device=job.device, requires_grad=True),
                         signs.reshape(len(planes), *shape).to(job.device))
    if not tensors:
        return {}

    def weights():
        out = dict(job.base)
        for name, vec in job.vectors.items():
            out[name] = job.base[name] + vec
        for name, (_, scales, signs) in tensors.items():
            out[name] = job.base[name] + torch.einsum("k,k...->...", scales, signs)
        return out

    trainables = [t[1] for t in tensors.values()]
    if params.objective == "logit_mse":
        report = distill_logit_mse(job, weights, trainables, steps=params.steps, lr=params.lr,
                                   batch_size=params.batch_size, seq_len=params.seq_len)
        notes = report.get("warnings", [])
        report = {k: v for k, v in report.items() if k not in ("lrs", "warnings")}
    else:
        notes = []
        report = {"objective": "task_kl", **distill(job, weights, trainables,
                                                    n_prompts=params.n_prompts,
                                                    steps=params.steps, lr=params.lr)}
    new_scales = {t[0]: t[1].detach().cpu().numpy() for t in tensors.values()}

    def patch(index: int, data: bytes) -> bytes:
        if index not in new_scales:
            return data
        k = data[0]
        writer = bits.SectionWriter()
        writer.raw(data[:1])
        writer.f16(np.clip(new_scales[index], -65504, 65504))
        writer.raw(data[1 + 2 * k:])
        return writer.getvalue()

    return {"patch": patch, "report": {"distill": report, **({"warnings": notes} if notes else {})}}


def validate(params: Params, ratio: float | None) -> None:
    if params.distill and params.tasks is not None and not params.tasks:
        raise ParameterError("bitdelta: tasks must not be empty")
    if params.tasks is not None and params.objective == "logit_mse":
        raise ParameterError("bitdelta: tasks is read by objective task_kl; logit_mse distils on "
                             "generic text (calibration_data, else the zoo's pretraining text)")
    if params.calibration_data is not None:
        if not params.distill:
            raise ParameterError("bitdelta: calibration_data is read only when the scales are "
                                 "distilled (set distill: true)")
        if params.tasks is not None:
            raise ParameterError("bitdelta: give tasks or calibration_data, not both")
