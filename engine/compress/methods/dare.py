"""DARE as a compressor: keep a random subset of the delta's entries, rescale by 1/p.

Drop And REscale (Yu et al.) keeps each entry with probability ``p`` and multiplies the
survivors by ``1/p`` so the delta is unbiased. Here exactly ``k = round(p * n)`` entries are
kept (a uniformly random ``k``-subset from ``engine.compress.masks``, rescaled by ``n / k``),
so the byte size is exact: the mask regenerates from the seed and costs nothing; only the
kept values are stored, in fp16.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from engine.compress import bits
from engine.compress.masks import keep_positions
from engine.compress.registry import CompressParams
from engine.errors import ArtifactError

NAME = "dare"
PAPER = ("Yu et al., Language Models are Super Mario: Absorbing Abilities from Homologous Models "
         "as a Free Lunch, ICML 2024 (arXiv:2311.03099)")
SOLVED = ("density",)
RANDOMIZED = True


class Params(CompressParams):
    density: float | None = Field(None, gt=0.0, le=1.0,
                                  description="Fraction of entries kept (solved from --ratio).")
    seed: int = Field(0, ge=0, description="Seed of the random masks (stored; masks regenerate from it).")


def encode(delta: torch.Tensor, budget: int | None, params: Params, ctx) -> bytes:
    flat = delta.reshape(-1)
    n = flat.numel()
    cw = bits.count_width(n)
    if budget is None:
        k = min(n, max(1, round(params.density * n)))
    else:
        k = min(n, max(0, (budget - cw) // 2))
    if k == 0:
        return b""
    idx = keep_positions(ctx.seed, n, k)
    ctx.info.update(kept=int(k), density=k / n)
    out = bits.SectionWriter()
    out.uint(k, cw)
    out.f16(flat[torch.from_numpy(idx).to(flat.device)].cpu().numpy())
    return out.getvalue()


def decode(reader: bits.SectionReader, shape, params: Params, ctx) -> torch.Tensor:
    n = int(np.prod(shape))
    k = reader.uint(bits.count_width(n))
    if not 0 < k <= n:
        raise ArtifactError(f"{reader.what}: kept count {k} outside 1..{n}")
    values = torch.from_numpy(reader.f16(k))
    reader.done()
    out = torch.zeros(n, dtype=torch.float32)
    out[torch.from_numpy(keep_positions(ctx.seed, n, k))] = values * (n / k)
    return out.reshape(tuple(shape)).to(ctx.device)
