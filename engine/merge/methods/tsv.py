"""Task Singular Vectors merge (TSV-M): per matrix, low-rank task vectors with decorrelated bases.

For a 2-D tensor: SVD of each delta d_i = U_i S_i V_i^T; keep each task's top k singular
triplets, k = int(min(m, n) * keep_fraction) (at least 1; keep_fraction defaults to 1/N as
in the authors' code); stack the kept left vectors into U = [U_1k ... U_Nk] and the right
ones into V; replace each stack by its orthogonal polar factor (P Q^T from the SVD P S Q^T,
the nearest matrix with orthonormal columns: Procrustes), which removes the overlap between
tasks' subspaces; rebuild U' diag(S) V'^T and add alpha times it to the base.
Other tensors (1-D, 3-D+) get the plain mean of the deltas.

alpha: the authors tune it on validation data over {0.1, 0.2, ..., 3.0} (AntoAndGar/
task_singular_vectors: src/eval/eval.py, n_eval_points 31), choosing the best mean normalised
accuracy; alpha = 1 is our untuned default, and bench/merge_quality.py reports both it and the
alpha tuned on the zoo's dev examples.

Polar factor of a rank-deficient stack: directions with singular value <= rcond * s_max
are dropped (they carry no information; a full SVD would fill them with an arbitrary
completion). This makes N copies of a delta of rank <= k merge back to that delta.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from engine.merge.common import MethodParams, NoModelParams, finish, prepare_inputs

NAME = "tsv"
PAPER = "Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model Merging, CVPR 2025"
REQUIRES_BASE = True


class Params(MethodParams):
    alpha: float = Field(1.0, description="Scale of the merged task vector before adding it to the base (the authors tune "
                         "it on validation over 0.1-3.0; 1 is our untuned default).")
    keep_fraction: float | None = Field(
        None, gt=0.0, le=1.0, description="Fraction of each task's singular triplets kept; empty = 1/N (the method's default)."
    )


ModelParams = NoModelParams


def validate(params: Params, model_params: Sequence[ModelParams]) -> None:
    return None


def polar_factor(a: torch.Tensor) -> torch.Tensor:
    """Orthonormal factor P Q^T of a = P S Q^T on a's range (null directions dropped)."""
    p, s, qh = torch.linalg.svd(a, full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return torch.zeros_like(a)
    rcond = max(a.shape) * torch.finfo(a.dtype).eps
    keep = s > rcond * s[0]
    return p[:, keep] @ qh[keep, :]


def merge_matrix(deltas: Sequence[torch.Tensor], keep_fraction: float) -> torch.Tensor:
    """The TSV-merged delta of N same-shaped 2-D deltas."""
    rank = min(deltas[0].shape)
    k = min(rank, max(1, int(rank * keep_fraction)))
    us, ss, vhs = [], [], []
    for d in deltas:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k, :])
    u_orth = polar_factor(torch.cat(us, dim=1))
    vh_orth = polar_factor(torch.cat(vhs, dim=0))
    return (u_orth * torch.cat(ss)) @ vh_orth


def merge_tensor(
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    model_params: list[ModelParams],
    params: Params,
    *,
    name: str = "",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    base32, inputs = prepare_inputs(NAME, base, tensors, model_params, name=name, requires_base=True)
    deltas = [t - base32 for t in inputs]
    if base32.dim() == 2:
        fraction = params.keep_fraction if params.keep_fraction is not None else 1.0 / len(deltas)
        merged = merge_matrix(deltas, fraction)
    else:
        merged = torch.stack(deltas).mean(dim=0)
    return finish(base32 + params.alpha * merged, NAME, name)
