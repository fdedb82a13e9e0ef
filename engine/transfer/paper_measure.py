"""The Neural Incompatibility paper's parametric-structural measure: per module, the cosine
(flattened) between a LoRA initialisation's update ``s B A`` and the student's weight W
("LoRA vs Original") and the weight left after the PiSSA-style injection ``W - s B A`` ("LoRA vs
Remaining"); beside it, the same two cosines for the student's own top-r principal components
(PiSSA's initialisation), the paper's reference (about 0.15 vs Original on Llama-2-7B, while
the 13B's extracted update is about 0 vs Original and negative vs Remaining)."""

from __future__ import annotations

import torch

EMBED = "model.embed_tokens"


def cosine(x: torch.Tensor, y: torch.Tensor) -> float | None:
    x, y = x.double().flatten(), y.double().flatten()
    nx, ny = float(x.norm()), float(y.norm())
    if nx == 0.0 or ny == 0.0:
        return None
    return float(x @ y) / (nx * ny)


def principal_update(w: torch.Tensor, rank: int) -> torch.Tensor:
    """PiSSA's ``B A``: the rank-r truncated SVD of W itself."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    r = min(rank, s.numel())
    return (u[:, :r] * s[:r]) @ vh[:r]


def lora_cosines(original: dict[str, torch.Tensor], factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 scale: float) -> dict[str, dict]:
    """``{module: {vs_original, vs_remaining, pissa_vs_original, pissa_vs_remaining}}`` for the
    LoRA initialisation ``factors`` ({module: (A, B)}) of the student with weights ``original``."""
    out = {}
    for name, (a, b) in factors.items():
        w = original[f"{name}.weight"].double()
        if name == EMBED:
            w = w.mT  # the embedding's LoRA acts on its transpose (hidden x vocab)
        update = scale * (b.double().cpu() @ a.double().cpu())
        pissa = principal_update(w, a.shape[0])
        out[name] = {"vs_original": cosine(update, w), "vs_remaining": cosine(update, w - update),
                     "pissa_vs_original": cosine(pissa, w), "pissa_vs_remaining": cosine(pissa, w - pissa)}
    return out


def summary(cosines: dict[str, dict], suffixes=("mlp.up_proj", "mlp.down_proj")) -> dict:
    """Means over the layers of each module kind the paper plots (up_proj, down_proj)."""
    out = {}
    for suffix in suffixes:
        rows = [v for k, v in cosines.items() if k.endswith(suffix)]
        out[suffix] = {key: (sum(r[key] for r in rows if r[key] is not None)
                             / max(1, sum(r[key] is not None for r in rows))
                             if any(r[key] is not None for r in rows) else None)
                       for key in ("vs_original", "vs_remaining", "pissa_vs_original",
                                   "pissa_vs_remaining")}
    return out
