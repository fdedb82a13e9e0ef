"""BitDelta: the delta as a sign matrix times one scale, ``d ~ alpha * sign(d)``.

BitDelta (Liu et al.) stores 1 bit per entry plus one fp16 scale per matrix
(``alpha = mean |d|``, the L2-optimal scale for a sign matrix), 16x against fp16; its optional
second stage distils the scales on calibration data by matching the fine-tune's logits
(``distill=True`` here: Adam on the scales, KL to the fine-tune's next-token distribution,
prompts from the zoo tasks' training split, or from the dev split of ``calibration_data``, a
JSONL file of the user's).

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


# Parameter sets measured in bench/README.md: BitDelta with its stage 2 (scale distillation).
PRESETS = {"small-models": {"distill": True}}


class Params(CompressParams):
    planes: int | None = Field(None, ge=1, le=MAX_PLANES,
                               description="Sign planes per matrix (1 = BitDelta; solved from --ratio).")
    distill: bool = Field(False, description="Distil the scales on calibration prompts (BitDelta stage 2).")
    tasks: list[str] | None = Field(None, description="Calibration tasks (default: the fine-tune's zoo task).")
    calibration_data: str | None = Field(None, description="A JSONL file of {prompt, answer} lines: "
                                                           "distil on its dev split instead of tasks.")
    n_prompts: int = Field(32, ge=1, le=4096, description="Calibration prompts.")
    steps: int = Field(100, ge=1, le=10000, description="Distillation steps.")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate of the scales.")


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
def calibrate(job, params: Params) -> dict:
    if not params.distill:
        return {}
    from engine.compress.calibration import distill

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

    report = distill(job, weights, [t[1] for t in tensors.values()],
                     n_prompts=params.n_prompts, steps=params.steps, lr=params.lr)
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

    return {"patch": patch, "report": {"distill": report}}


def validate(params: Params, ratio: float | None) -> None:
    if params.distill and params.tasks is not None and not params.tasks:
        raise ParameterError("bitdelta: tasks must not be empty")
    if params.calibration_data is not None:
        if not params.distill:
            raise ParameterError("bitdelta: calibration_data is read only when the scales are "
                                 "distilled (set distill: true)")
        if params.tasks is not None:
            raise ParameterError("bitdelta: give tasks or calibration_data, not both")
