"""RegMean: merge a linear layer so its outputs best match every model's on that model's inputs.

For a weight W (out, in) applied as y = x W^T, with G_i = X_i^T X_i (in, in) the Gram matrix
of the layer's inputs on task i's prompts, minimising sum_i |X_i W^T - X_i W_i^T|^2 gives
    W^T = (sum_i G_i)^-1 sum_i G_i W_i^T.
Off-diagonal Gram entries are scaled by alpha first (alpha = 1: exact solution; alpha = 0:
per-input-feature weighted mean); per-model weights multiply G_i. A ridge r * m * w_i * I is
added to each weighted Gram (r relative, m the mean diagonal of sum_i w_i G_i / sum_i w_i): an
input feature no prompt ever activates has a zero row and column in every G_i, and the ridge
makes that column of W the weighted mean of the models' columns instead of 0.
Tensors that are not 2-D, or have no Gram matrices (embeddings, norms, biases), get the
weighted mean.

``stats`` is a list of Gram matrices, one per model, for a weight stored (out, in) as in
``nn.Linear``; or a ``GramStats`` whose ``transposed`` flag says the weight is stored (in, out),
as in GPT-2's Conv1D (y = x W): it is merged as W^T and transposed back, so square Conv1D
weights are not mistaken for Linear ones. ``engine.merge.calibration`` computes both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pydantic import Field

from engine.errors import ParameterError
from engine.merge.common import DefaultWeight, MethodParams, finish, prepare_inputs, prepare_stats, weights_column

NAME = "regmean"
PAPER = "Jin et al., Dataless Knowledge Fusion by Merging Weights of Language Models, ICLR 2023 (arXiv:2212.09849)"
REQUIRES_BASE = False
STATS = "gram"  # stats=[Gram matrix X_i^T X_i of the layer's inputs, (in, in), per model] or None


@dataclass(frozen=True)
class GramStats:
    """Gram matrices of one layer's inputs, one per model; ``transposed``: weight is (in, out)."""

    grams: tuple[torch.Tensor, ...]
    transposed: bool = False

    def __len__(self) -> int:
        return len(self.grams)


class Params(MethodParams):
    alpha: float = Field(0.9, ge=0.0, le=1.0, description="Scale of the off-diagonal Gram entries (the authors' reduce_non_diagonal_ratio).")
    ridge: float = Field(1e-6, ge=0.0, description="Relative ridge added to each Gram diagonal (times its mean diagonal).")


class ModelParams(DefaultWeight):
    weight: float = Field(1.0, ge=0.0, description="Multiplies this model's Gram matrix (and its share of the fallback mean).")


def validate(params: Params, model_params: Sequence[ModelParams]) -> None:
    if sum(mp.weight for mp in model_params) <= 0:
        raise ParameterError(f"{NAME}: at least one weight must be positive")


def weighted_mean(inputs: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    w = weights_column(weights, inputs[0])
    return (torch.stack(list(inputs)) * w).sum(dim=0) / w.sum()


def regmean_matrix(
    weights_in: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], model_weights: Sequence[float], alpha: float, ridge: float
) -> torch.Tensor:
    n_in = grams[0].shape[0]
    eye = torch.eye(n_in, dtype=grams[0].dtype, device=grams[0].device)
    lhs = torch.zeros_like(grams[0])
    rhs = torch.zeros(n_in, weights_in[0].shape[0], dtype=grams[0].dtype, device=grams[0].device)
    scaled = []
    for g, w in zip(grams, model_weights):
        g = (g + g.T) / 2
        g = w * (alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g)))
        scaled.append(g)
        lhs = lhs + g
    level = float(torch.diagonal(lhs).mean()) / max(sum(model_weights), 1e-30)
    if level <= 0:
        return weighted_mean(weights_in, model_weights)
    for g, w, wi in zip(scaled, model_weights, weights_in):
        rhs = rhs + (g + ridge * level * w * eye) @ wi.T
    lhs = lhs + ridge * level * sum(model_weights) * eye
    chol, info = torch.linalg.cholesky_ex(lhs)
    if int(info) == 0:
        solution = torch.cholesky_solve(rhs, chol)
    else:  # singular (ridge 0 and a dead feature): least-squares solution
        solution = torch.linalg.lstsq(lhs, rhs).solution
    return solution.T


def merge_tensor(
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    model_params: list[ModelParams],
    params: Params,
    *,
    name: str = "",
    generator: torch.Generator | None = None,
    stats: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    validate(params, model_params)
    _, inputs = prepare_inputs(NAME, None, tensors, model_params, name=name, requires_base=False)
    weights = [mp.weight for mp in model_params]
    if stats is None or inputs[0].dim() != 2:
        return finish(weighted_mean(inputs, weights), NAME, name)
    transposed = isinstance(stats, GramStats) and stats.transposed
    grams_in = list(stats.grams) if isinstance(stats, GramStats) else stats
    if transposed:
        inputs = [t.T for t in inputs]
    n_in = inputs[0].shape[1]
    grams = prepare_stats(NAME, grams_in, len(inputs), (n_in, n_in), inputs[0].device, name=name, what="Gram matrix",
                          dtype=inputs[0].dtype)
    out = regmean_matrix(inputs, grams, weights, params.alpha, params.ridge)
    return finish(out.T.contiguous() if transposed else out, NAME, name)
