"""Per-tensor metrics of one task vector ``d`` (see ../shared/specs/analysis.md).

Scalars (every tensor):

- ``fro_norm`` = ||d||_F (float64 accumulation); ``rel_norm`` = ||d||_F / ||W0||_F (None if the
  base is zero);
- ``sparsity``: fraction of entries with |d| < eps * max|d| (1.0 for an all-zero delta);
- ``kurtosis``: excess kurtosis of the entries, m4 / m2^2 - 3 (0 for a Gaussian; Fisher's
  definition, as ``scipy.stats.kurtosis``); None when all entries are equal;
- ``nan_count`` / ``inf_count`` of the delta. Every other metric is computed on the finite part:
  non-finite entries are replaced by zero first.

Spectral metrics (2-D tensors; higher-rank tensors are viewed as (shape[0], -1); 1-D: None),
with singular values s_1 >= s_2 >= ... of d:

- ``top_singular_values``: the top ``top_k``;
- ``effective_rank`` = exp(H(p)), p_j = s_j / sum s (Roy and Vetterli);
- ``stable_rank`` = ||d||_F^2 / s_1^2;
- ``energy_k_50/90/99``: the smallest k with sum_{j<=k} s_j^2 >= 50/90/99 % of ||d||_F^2;
- an all-zero delta has rank 0: every spectral number is 0 (singular values too).

How the spectrum is obtained (``spectrum`` in the result; ``method="auto"`` picks):

- ``"exact"``: matrices with at most ``exact_max_elements`` entries: ``torch.linalg.svdvals``
  in float64, the full spectrum; every metric above is exact.
- ``"gram"``: matrices whose smaller side is at most ``gram_max_dim``: the eigenvalues of the
  float64 Gram matrix of the smaller side (``d d^T`` or ``d^T d``), s_j = sqrt(lambda_j). The
  full spectrum, accurate for values above about 1e-7 s_1 (below that, squaring loses them;
  there are at most gram_max_dim of them, so their share of sum s is at most about 2e-4).
  Several times faster than an SVD on the CPU.
- ``"randomized"``: larger matrices: the top q = top_k + oversample singular values by
  randomized subspace iteration (Halko, Martinsson and Tropp 2011; our own loop, fp32
  products, re-orthonormalised every step, Rayleigh-Ritz in float64) that iterates until the
  top-k Ritz values change by less than ``svd_tol`` (relative) or ``max_power_iters`` is
  reached (``svd_iterations``, ``svd_converged``). The rest of the spectrum is not computed;
  its energy is known exactly, ``tail = ||d||_F^2 - sum_{j<=q} s_j^2``
  (``tail_energy_fraction``). ``stable_rank`` is then exact (up to the accuracy of s_1), an
  ``energy_k_*`` reached within the q computed values is exact, and ``effective_rank`` and the
  other ``energy_k_*`` are estimates from a modelled tail (see :func:`modelled_tail`).
  ``bench/README.md`` reports measured errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

ENERGY_LEVELS = (0.5, 0.9, 0.99)
_CHUNK = 1 << 22  # entries per chunk for float64 moment sums (bounded extra memory)


class SpectrumParams(BaseModel):
    """Parameters of the per-tensor metrics (all part of the cache key)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    top_k: int = Field(16, ge=1, le=4096, description="Top singular values reported per tensor.")
    method: Literal["auto", "exact", "gram", "randomized"] = Field(
        "auto", description="How spectra are computed; auto: exact for small matrices, gram up to "
        "gram_max_dim, randomized beyond.")
    exact_max_elements: int = Field(1 << 18, ge=0, description="auto: matrices up to this many entries "
                                    "get float64 svdvals.")
    gram_max_dim: int = Field(2048, ge=0, description="auto: matrices whose smaller side is at most "
                              "this get the full spectrum from their float64 Gram matrix.")
    oversample: int = Field(16, ge=0, le=4096, description="Randomized SVD: sketch columns beyond top_k "
                            "(subspace vectors for angles come from the same sketch).")
    max_power_iters: int = Field(40, ge=0, le=1000, description="Maximum subspace iterations.")
    svd_tol: float = Field(1e-6, gt=0.0, lt=1.0, description="Stop iterating when the top-k Ritz values "
                           "change by less than this (relative).")
    sparsity_eps: float = Field(1e-3, ge=0.0, lt=1.0, description="Entries with |d| < eps * max|d| count as zero.")
    seed: int = Field(0, ge=0, description="Seed of the randomized sketch.")


@dataclass
class Spectrum:
    """Singular values of a matrix and how they were obtained."""

    values: torch.Tensor  # float64, descending: all of them, or the top q ("randomized")
    method: str  # "exact" | "gram" | "randomized"
    total_energy: float  # ||d||_F^2
    full_rank: int  # min(m, n)
    left: torch.Tensor | None = None  # (m, r) left singular vectors, when asked for
    iterations: int = 0
    converged: bool = True

    @property
    def exact(self) -> bool:
        """True when ``values`` is the full spectrum (exact or gram)."""
        return self.method != "randomized"

    @property
    def tail_energy(self) -> float:
        if self.exact:
            return 0.0
        return max(self.total_energy - float((self.values ** 2).sum()), 0.0)


def as_matrix(t: torch.Tensor) -> torch.Tensor | None:
    """The matrix view used for spectra: 2-D as is, N-D as (shape[0], -1); 1-D/0-D: None."""
    if t.dim() < 2:
        return None
    return t if t.dim() == 2 else t.reshape(t.shape[0], -1)


def finite_part(d: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(d with NaN/Inf replaced by 0, nan count, inf count); no copy when all is finite."""
    nan = int(torch.isnan(d).sum())
    inf = int(torch.isinf(d).sum())
    if nan or inf:
        d = torch.where(torch.isfinite(d), d, torch.zeros((), dtype=d.dtype, device=d.device))
    return d, nan, inf


def sq_norm(t: torch.Tensor) -> float:
    """||t||_F^2 accumulated in float64, in chunks."""
    flat = t.reshape(-1)
    total = 0.0
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start:start + _CHUNK].double()
        total += float(torch.dot(chunk, chunk))
    return total


def _moments(flat: torch.Tensor) -> tuple[float, float, float]:
    """(mean, m2, m4) central moments of the entries, float64, two passes in chunks."""
    n = flat.numel()
    mean = 0.0
    for start in range(0, n, _CHUNK):
        mean += float(flat[start:start + _CHUNK].double().sum())
    mean /= n
    m2 = m4 = 0.0
    for start in range(0, n, _CHUNK):
        c = flat[start:start + _CHUNK].double() - mean
        c2 = c * c
        m2 += float(c2.sum())
        m4 += float((c2 * c2).sum())
    return mean, m2 / n, m4 / n


def kurtosis(t: torch.Tensor) -> float | None:
    """Excess kurtosis of the entries (m4 / m2^2 - 3); None when they are all equal (or empty)."""
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return None
    _, m2, m4 = _moments(flat)
    if m2 <= 0.0:
        return None
    return m4 / (m2 * m2) - 3.0


def sparsity(t: torch.Tensor, eps: float) -> float:
    """Fraction of entries with |t| < eps * max|t| (1.0 when every entry is zero)."""
    if t.numel() == 0:
        return 1.0
    low, high = torch.aminmax(t)
    peak = max(-float(low), float(high))
    if peak == 0.0:
        return 1.0
    flat = t.reshape(-1)
    below = sum(int((flat[i:i + _CHUNK].abs() < eps * peak).sum()) for i in range(0, flat.numel(), _CHUNK))
    return below / t.numel()


# --------------------------------------------------------------------------- spectra
def _orthonormal(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, r = torch.linalg.qr(y, mode="reduced")
    return q, r


def randomized_svd(a: torch.Tensor, q: int, *, top: int | None = None, max_iters: int = 40,
                   tol: float = 1e-6, seed: int = 0, want_left: int = 0,
                   ) -> tuple[torch.Tensor, torch.Tensor | None, int, bool]:
    """Top ``q`` singular values of ``a`` (m x n, float32) by randomized subspace iteration.

    Returns ``(values float64 descending, left vectors (m, want_left) or None, iterations,
    converged)``. Convergence: the top ``top`` (default q) Ritz values, which grow towards the
    true values, change by less than ``tol`` relative between two iterations.
    """
    m, n = a.shape
    q = max(1, min(q, m, n))
    top = q if top is None else max(1, min(top, q))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, q, generator=gen, dtype=torch.float32).to(device=a.device, dtype=a.dtype)
    basis, _ = _orthonormal(a @ omega)  # (m, q)
    previous = None
    converged = max_iters == 0
    iterations = 0
    for iterations in range(1, max_iters + 1):
        right, _ = _orthonormal(a.mT @ basis)  # (n, q)
        basis, r = _orthonormal(a @ right)  # (m, q); svd(r) = svd(a @ right), Ritz estimates
        estimate = torch.linalg.svdvals(r.double())[:top]
        if previous is not None:
            change = (estimate - previous).abs()
            scale = estimate.clamp_min(float(estimate[0]) * 1e-6 if float(estimate[0]) > 0 else 1.0)
            if bool((change <= tol * scale).all()):
                converged = True
                break
        previous = estimate
    # Rayleigh-Ritz on the final basis: b = basis^T a, exact SVD of the small (q x n) matrix.
    b = (basis.mT @ a).double()
    if want_left:
        u_small, values, _ = torch.linalg.svd(b, full_matrices=False)
        left = (basis.double() @ u_small[:, :want_left]).to(torch.float32)
    else:
        values, left = torch.linalg.svdvals(b), None
    return values, left, iterations, converged


def _choose_method(m: int, n: int, params: SpectrumParams) -> str:
    if params.method != "auto":
        return params.method
    if m * n <= params.exact_max_elements:
        return "exact"
    if min(m, n) <= params.gram_max_dim:
        return "gram"
    return "randomized"


def _gram_spectrum(matrix: torch.Tensor, want_left: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All singular values from the eigenvalues of the float64 Gram matrix of the smaller side
    (and the top ``want_left`` left singular vectors from its eigenvectors)."""
    m, n = matrix.shape
    wide = m <= n
    # float64 Gram accumulated over slices of the long side: never a float64 copy of the matrix
    gram = None
    step = max(1, _CHUNK // max(min(m, n), 1))
    for start in range(0, max(m, n), step):
        part = (matrix[:, start:start + step] if wide else matrix[start:start + step]).double()
        piece = part @ part.mT if wide else part.mT @ part
        gram = piece if gram is None else gram.add_(piece)
    if want_left:
        evals, evecs = torch.linalg.eigh(gram)
    else:
        evals, evecs = torch.linalg.eigvalsh(gram), None
    values = evals.flip(0).clamp_min(0.0).sqrt()
    left = None
    if want_left:
        top = evecs.flip(1)[:, :want_left]
        if wide:
            left = top
        else:  # eigenvectors are right singular vectors: u = a v / s
            scale = values[:want_left].clamp_min(torch.finfo(torch.float64).tiny)
            left = (matrix.double() @ top) / scale
        left = left.to(torch.float32)
    return values, left


def compute_spectrum(matrix: torch.Tensor, params: SpectrumParams, *, want_left: int = 0,
                     total_energy: float | None = None) -> Spectrum:
    """Singular values of ``matrix`` by the method ``params`` picks (see the module docstring),
    plus ``want_left`` left singular vectors when asked (at most top_k + oversample)."""
    m, n = matrix.shape
    full_rank = min(m, n)
    energy = sq_norm(matrix) if total_energy is None else total_energy
    want_left = min(want_left, full_rank)
    if energy == 0.0 or full_rank == 0:
        count = min(params.top_k, full_rank)
        return Spectrum(torch.zeros(count, dtype=torch.float64), "exact", 0.0, full_rank, None)
    method = _choose_method(m, n, params)
    q = params.top_k + params.oversample
    if method == "randomized" and q >= full_rank:
        method = "exact"  # the sketch would be as large as the matrix
    want_left = min(want_left, q)  # never changes the sketch: values do not depend on it
    if method == "exact":
        d64 = matrix.double()
        if want_left:
            u, values, _ = torch.linalg.svd(d64, full_matrices=False)
            left = u[:, :want_left].to(torch.float32)
        else:
            values, left = torch.linalg.svdvals(d64), None
        return Spectrum(values.cpu(), "exact", energy, full_rank, left)
    if method == "gram":
        values, left = _gram_spectrum(matrix, want_left)
        return Spectrum(values.cpu(), "gram", energy, full_rank, left)
    values, left, iters, ok = randomized_svd(
        matrix.float(), q, top=params.top_k, max_iters=params.max_power_iters, tol=params.svd_tol,
        seed=params.seed, want_left=want_left)
    return Spectrum(values.cpu(), "randomized", energy, full_rank, left, iters, ok)


def _local_slope(values: torch.Tensor) -> float:
    """-d log s / d log j over the second half of the computed values (least squares)."""
    q = values.numel()
    if q < 4:
        return 0.0
    j = torch.arange(1, q + 1, dtype=torch.float64)[q // 2:]
    x = torch.log(j) - torch.log(j).mean()
    y = torch.log(values.double()[q // 2:].clamp_min(1e-300))
    return -float((x * (y - y.mean())).sum() / (x * x).sum())


def _power_tail(last: float, q: int, count: int, tail: float) -> tuple[float, torch.Tensor]:
    """s_j = last * (j / q)^-alpha for j = q+1 .. q+count, alpha set (bisection) to carry ``tail``."""
    j = torch.arange(q + 1, q + count + 1, dtype=torch.float64) / q
    lo, hi = 0.0, 64.0
    for _ in range(60):
        alpha = (lo + hi) / 2
        if float(((last * j ** -alpha) ** 2).sum()) > tail:
            lo = alpha
        else:
            hi = alpha
    return alpha, last * j ** -alpha


def modelled_tail(spec: Spectrum) -> torch.Tensor:
    """Stand-ins for the uncomputed singular values of a randomized spectrum (empty otherwise).

    The r = min(m, n) - q missing values carry the known tail energy E_t (rescaled to match it
    exactly) and start from the last computed value s_q. Their shape:

    - a power law s_j = s_q (j/q)^-alpha, when the computed values already decay like one: the
      log-log slope of their second half is at least 0.4 and within 30 % of the alpha that
      carries E_t;
    - otherwise s_q (1 - t/r)^gamma, t = 0 .. r-1, with gamma = (s_q^2 / mean - 1) / 2 so that it
      carries E_t (mean = E_t / r): flat for gamma = 0, linear to zero for 1, the shape of a
      random matrix's bulk for about 0.5 to 1.5;
    - flat at sqrt(mean) when gamma > 10 (a gap: a low-rank part over a much weaker floor) or
      when the mean square exceeds s_q^2.

    Estimates, not bounds: on spectra of random, low-rank-plus-noise, power-law and exponential
    shapes they put effective rank and energy k within about 10 %; ``bench/README.md`` reports
    the errors measured on the benchmark deltas.
    """
    count = spec.full_rank - spec.values.numel()
    tail = spec.tail_energy
    if spec.exact or count <= 0 or tail <= 0.0:
        return torch.zeros(0, dtype=torch.float64)
    q = spec.values.numel()
    last = float(spec.values[-1]) if q else 0.0
    mean_sq = tail / count
    flat = torch.full((count,), math.sqrt(mean_sq), dtype=torch.float64)
    if last <= 0.0 or mean_sq >= last * last:
        return flat
    slope = _local_slope(spec.values)
    alpha, power = _power_tail(last, q, count, tail)
    if slope >= 0.4 and abs(alpha - slope) <= 0.3 * slope:
        values = power
    else:
        gamma = (last * last / mean_sq - 1.0) / 2.0
        if gamma > 10.0:
            return flat
        t = torch.arange(count, dtype=torch.float64) / count
        values = last * (1.0 - t) ** gamma
    energy = float((values * values).sum())
    return values * math.sqrt(tail / energy) if energy > 0 else flat


def _modelled_spectrum(spec: Spectrum) -> torch.Tensor:
    values = spec.values.double()
    tail = modelled_tail(spec)
    return torch.cat([values, tail]) if tail.numel() else values


def effective_rank(spec: Spectrum) -> float:
    """exp(entropy of s / sum s); randomized: computed values plus the modelled tail."""
    s = _modelled_spectrum(spec)
    s = s[s > 0]
    total = float(s.sum())
    if total <= 0.0:
        return 0.0
    p = s / total
    return math.exp(-float((p * torch.log(p)).sum()))


def stable_rank(spec: Spectrum) -> float:
    top = float(spec.values[0]) if spec.values.numel() else 0.0
    if top <= 0.0:
        return 0.0
    return spec.total_energy / (top * top)


def energy_k(spec: Spectrum, level: float) -> int:
    """Smallest k with the top-k energy >= level * ||d||^2 (exact within the computed values;
    beyond them, from the modelled tail)."""
    total = spec.total_energy
    if total <= 0.0:
        return 0
    target = level * total
    cumulative = torch.cumsum(_modelled_spectrum(spec) ** 2, dim=0)
    # tolerate float64 rounding of the sum against the separately computed total
    reached = torch.nonzero(cumulative >= target * (1 - 1e-12)).flatten()
    if reached.numel():
        return int(reached[0]) + 1
    return int(cumulative.numel())


def _clean(x: float | None) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return float(x)


def tensor_metrics(delta: torch.Tensor, base: torch.Tensor | None, params: SpectrumParams, *,
                   want_left: int = 0) -> tuple[dict, torch.Tensor | None]:
    """All per-tensor metrics of one delta as plain JSON-ready data, plus the top ``want_left``
    left singular vectors (for subspace angles) when asked and the tensor is a matrix."""
    d, nan, inf = finite_part(delta)
    energy = sq_norm(d)
    fro = math.sqrt(energy)
    base_norm = math.sqrt(sq_norm(base)) if base is not None else None
    out: dict = {
        "shape": list(delta.shape),
        "numel": int(delta.numel()),
        "fro_norm": fro,
        "rel_norm": (fro / base_norm) if base_norm else None,
        "max_abs": max(-float(d.min()), float(d.max())) if d.numel() else 0.0,
        "sparsity": sparsity(d, params.sparsity_eps),
        "kurtosis": _clean(kurtosis(d)),
        "nan_count": nan,
        "inf_count": inf,
    }
    matrix = as_matrix(d)
    left = None
    if matrix is None:
        out.update({"spectrum": None, "top_singular_values": None, "effective_rank": None,
                    "stable_rank": None, **{f"energy_k_{round(l * 100)}": None for l in ENERGY_LEVELS}})
        return out, None
    spec = compute_spectrum(matrix, params, want_left=want_left, total_energy=energy)
    left = spec.left
    out.update({
        "spectrum": spec.method,
        "top_singular_values": [float(v) for v in spec.values[:params.top_k]],
        "effective_rank": effective_rank(spec),
        "stable_rank": stable_rank(spec),
        **{f"energy_k_{round(l * 100)}": energy_k(spec, l) for l in ENERGY_LEVELS},
        "full_rank": spec.full_rank,
        "tail_energy_fraction": (spec.tail_energy / energy) if energy > 0 else 0.0,
        "svd_iterations": spec.iterations,
        "svd_converged": spec.converged,
    })
    return out, left
