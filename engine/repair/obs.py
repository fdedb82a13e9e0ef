"""The second-order machinery Safe Delta and IRR share (both adapted from SparseGPT).

For a linear layer ``y = W x`` and calibration inputs ``x``, the Hessian of the output drift
``L(W) = sum over samples of ||(W - W_ref) x||^2`` is ``H = (2/N) sum x x^T`` (the authors'
accumulation: per sample, every token). OBS fixes the entries of one column at a time; with the
inverse Hessian's upper Cholesky factor ``U`` (``H^-1 = U^T U``), ``U_jj^2`` is the inverse
Hessian diagonal once the columns before ``j`` are fixed, and row ``j`` of ``U`` spreads the
error of column ``j`` over the columns after it (the SparseGPT trick: no re-inversion).

Conditioning, as both authors: a column no input ever reached ("dead", ``H_jj = 0``) gets
``H_jj = 1``; then ``percdamp * mean(diag H)`` is added to the diagonal. A Hessian with a NaN
or Inf (a broken activation) is refused naming the tensor, never factorised.
"""

from __future__ import annotations

import torch

from engine.errors import NonFiniteError


def output_drift(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """``sum over samples of ||delta x||^2 / N`` = ``tr(delta H delta^T) / 2`` (float64)."""
    d = delta.double()
    return float(((d @ hessian.double()) * d).sum() / 2)


def condition(hessian: torch.Tensor, percdamp: float, *, name: str = "",
              path=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(damped H, dead-column mask)`` of a float32 copy of ``hessian``; NaN/Inf refused."""
    h = hessian.detach().to(torch.float32).clone()
    if not bool(torch.isfinite(h).all()):
        bad = int((~torch.isfinite(h)).sum())
        raise NonFiniteError(f"{bad} NaN/Inf value(s) in its calibration Hessian (the model's "
                             "activations on the calibration data are not finite); repair refused",
                             path=path, tensor=name or None)
    diag = torch.diagonal(h)
    dead = diag == 0
    h[dead, dead] = 1.0
    idx = torch.arange(h.shape[0], device=h.device)
    h[idx, idx] += percdamp * torch.mean(torch.diagonal(h))
    return h, dead


def inverse_upper_factor(damped: torch.Tensor, *, name: str = "", path=None) -> torch.Tensor:
    """``U`` upper triangular with ``U^T U = damped^-1``: Cholesky, inverse from the factor,
    Cholesky of the inverse (upper)."""
    lower, info = torch.linalg.cholesky_ex(damped)
    if int(info) != 0:
        raise NonFiniteError(f"its damped calibration Hessian is not positive definite (leading "
                             f"minor {int(info)}); raise percdamp", path=path, tensor=name or None)
    inverse = torch.cholesky_inverse(lower)
    upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
    if int(info) != 0:
        raise NonFiniteError("the inverse of its damped calibration Hessian is not positive "
                             "definite; raise percdamp", path=path, tensor=name or None)
    return upper
