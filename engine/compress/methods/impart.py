"""ImPart: importance-aware sparsification of the delta's singular vectors.

ImPart (Yang et al., ACL 2025) takes the SVD ``d = U S V^T`` and sparsifies each singular
vector pair with its own ratio: with ``s_i`` the singular values raised to ``C`` (the authors'
rescale parameter), the bottom ``beta`` fraction of components is pre-pruned, and component
``i`` of the rest drops a fraction ``p_i = gamma (1 - s_i / s_max)`` of the entries of ``u_i``
and of ``v_i`` (``gamma = (alpha - beta) / (1 - beta)``, ``alpha`` the target sparsity of U and
V); while the mean falls short of ``gamma`` the boundary shifts (the smallest kept components
are dropped whole). Surviving entries are rescaled by the inverse keep ratio (unbiased), and
the masks are random (the authors' ``randperm``; here the seeded, version-proof masks of
``engine.compress.masks``, so only the kept values and their counts are stored).

With a target ratio, ``alpha`` is solved by bisection so the section fits the byte budget
(the authors set it from the ratio as ``1 - 1/(2 CR)`` for square matrices, the same thing
before storage overheads). ``beta`` (pre-prune) and ``C`` default to the authors' released
configuration (``preprune_ratio: 0.8``, ``C: 0.5`` at CR 32); below ``alpha = 0.9`` ``beta``
is lowered to ``2 alpha - 1`` so that ``gamma`` stays >= 0.5 (the authors tune ``beta`` per
ratio on validation data, which a data-free compressor does not have).

ImPart-Qt (``quant: true``, the authors' quantised variant): the kept values of the first
``qt_counts[0]`` components are quantised at 8 bits, the next ``qt_counts[1]`` at 3 bits and the
rest at 2 bits (8-3-2, as the authors' configs and Delta-CoMe), in groups of ``group_size`` kept
values with one fp16 step each (our symmetric MSE-clipped round-to-nearest; the authors
quantise with GPTQ on calibration data, not done here).

Section: number of kept components ``r``, then for each component the kept counts in ``u_i``
and ``v_i``, then the kept values (fp16, or quantised: per group the fp16 step, then the packed
codes; ``sigma_i`` and the rescale folded in). An ImPart-Qt section starts with a zero count
and a u8 naming the middle tier's bit width (3) before ``r``; sections written before that
marker (whose middle tier was 4 bits) are read as such.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from engine.compress import bits
from engine.compress.masks import derive_seed, keep_positions
from engine.compress.methods.svd import svd
from engine.compress.quant import dequantize, quantize_groups
from engine.compress.registry import CompressParams
from engine.errors import ArtifactError

NAME = "impart"
PAPER = ("Yang et al., ImPart: Importance-Aware Delta-Sparsification for Improved Model "
         "Compression and Merging in LLMs, ACL 2025 (arXiv:2504.13237)")
SOLVED = ("sparsity",)
RANDOMIZED = True
QT_BITS = (8, 3, 2)  # ImPart-Qt's tiers
LEGACY_MIDDLE = 4  # the middle tier of ImPart-Qt sections written without the marker


# Parameter sets measured in bench/README.md: ImPart-Qt (the authors' quantised variant) with
# beta 0.9 and groups of 32 for matrices 128-320 wide.
PRESETS = {"small-models": {"quant": True, "preprune": 0.9, "group_size": 32}}


class Params(CompressParams):
    sparsity: float | None = Field(None, ge=0.0, lt=1.0,
                                   description="Target sparsity alpha of U and V (solved from --ratio).")
    preprune: float | None = Field(None, ge=0.0, lt=1.0,
                                   description="beta: fraction of components dropped first "
                                               "(default 0.8, or 2 alpha - 1 when smaller).")
    C: float = Field(0.5, gt=0.0, description="Exponent applied to singular values (authors' C).")
    seed: int = Field(0, ge=0, description="Seed of the random masks (stored; masks regenerate from it).")
    quant: bool = Field(False, description="ImPart-Qt: quantise the kept values (8 bits for the first "
                                           "qt_counts[0] components, 3 for the next qt_counts[1], 2 after).")
    qt_counts: tuple[int, int] = Field((2, 32), description="ImPart-Qt: components at 8 and at 3 bits.")
    group_size: int = Field(128, ge=4, description="ImPart-Qt: kept values per quantisation group.")


def sparsity_ratios(singular_values: np.ndarray, alpha: float, beta: float, C: float) -> np.ndarray:
    """Algorithm 1 of ImPart: per-component drop ratios (components past the end: dropped)."""
    s = np.asarray(singular_values, dtype=np.float64) ** C
    n = s.size
    keep = int(n * (1 - beta))
    if keep <= 0 or s.size == 0 or s[0] <= 0:
        return np.zeros(0)
    s = s[:keep]
    gamma = (alpha - beta) / (1 - beta)
    p = (1 - s / s.max()) * gamma
    i = p.size - 1
    while i >= 0 and p.mean() < gamma:  # shift the boundary: drop whole components
        p[i] = 1.0
        i -= 1
    return p[:i + 1]


def default_beta(alpha: float, params: Params) -> float:
    if params.preprune is not None:
        return min(params.preprune, alpha)
    return max(0.0, min(0.8, 2 * alpha - 1))


def keep_counts(p: np.ndarray, m: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Entries kept per component in u (length m) and v (length n): the authors drop int(len*p)."""
    ku = m - (m * p).astype(np.int64)
    kv = n - (n * p).astype(np.int64)
    return np.maximum(ku, 0), np.maximum(kv, 0)


def component_bits(r: int, params: Params, middle: int = QT_BITS[1]) -> np.ndarray:
    """Bits per kept value of each component (16: fp16 values, no quantisation)."""
    if not params.quant:
        return np.full(r, 16, dtype=np.int64)
    high, _, low = QT_BITS
    b = np.full(r, low, dtype=np.int64)
    n_high, n_middle = params.qt_counts
    b[:n_high] = high
    b[n_high:n_high + n_middle] = middle
    return b


def _values_bytes(k: np.ndarray, b: np.ndarray, group: int) -> int:
    quantised = b < 16
    total = int((2 * k[~quantised]).sum())
    kq, bq = k[quantised], b[quantised]
    total += int((2 * -(-kq // group)).sum() + ((kq * bq + 7) // 8).sum())
    return total


def section_size(ku: np.ndarray, kv: np.ndarray, m: int, n: int, params: Params | None = None) -> int:
    r = ku.size
    if r == 0:
        return 0
    rank_w = bits.count_width(min(m, n))
    head = rank_w + r * (bits.count_width(m) + bits.count_width(n))
    if params is None or not params.quant:
        return head + 2 * int(ku.sum() + kv.sum())
    head += rank_w + 1  # the ImPart-Qt marker: a zero count and the middle tier's width
    b = component_bits(r, params)
    return head + _values_bytes(ku, b, params.group_size) + _values_bytes(kv, b, params.group_size)


def plan(s: np.ndarray, m: int, n: int, budget: int | None, params: Params) -> np.ndarray:
    """Drop ratios per kept component, for the explicit sparsity or solved for ``budget``."""
    if budget is None:
        alpha = params.sparsity
        return sparsity_ratios(s, alpha, default_beta(alpha, params), params.C)

    def size(alpha: float) -> tuple[int, np.ndarray]:
        p = sparsity_ratios(s, alpha, default_beta(alpha, params), params.C)
        return section_size(*keep_counts(p, m, n), m, n, params), p

    lo, hi = 0.0, 1.0 - 1e-9  # size decreases with alpha
    if size(lo)[0] <= budget:
        return size(lo)[1]
    if size(hi)[0] > budget:
        return np.zeros(0)
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if size(mid)[0] <= budget:
            hi = mid
        else:
            lo = mid
    return size(hi)[1]


def _positions(ctx, component: int, side: str, length: int, k: int) -> np.ndarray:
    return keep_positions(derive_seed(ctx.seed, component, side), length, k)


def encode(delta: torch.Tensor, budget: int | None, params: Params, ctx) -> bytes:
    m, n = delta.shape
    u, s, vh = svd(delta)
    s_np = s.double().cpu().numpy()
    p = plan(s_np, m, n, budget, params)
    ku, kv = keep_counts(p, m, n)
    valid = (ku > 0) & (kv > 0)
    r = int(np.argmin(valid)) if not valid.all() else valid.size  # stop at the first empty one
    ku, kv = ku[:r], kv[:r]
    if r == 0:
        return b""
    ctx.info.update(components=r, kept=int(ku.sum() + kv.sum()))
    out = bits.SectionWriter()
    if params.quant:
        out.uint(0, bits.count_width(min(m, n)))
        out.uint(QT_BITS[1], 1)
    out.uint(r, bits.count_width(min(m, n)))
    for i in range(r):
        out.uint(int(ku[i]), bits.count_width(m))
        out.uint(int(kv[i]), bits.count_width(n))
    u_cpu, v_cpu, s_cpu = u.cpu(), vh.T.cpu(), s.cpu()
    widths = component_bits(r, params)
    for i in range(r):
        pu = _positions(ctx, i, "u", m, int(ku[i]))
        pv = _positions(ctx, i, "v", n, int(kv[i]))
        _put_values(out, u_cpu[pu, i] * float(s_cpu[i]) * (m / ku[i]), int(widths[i]), params.group_size)
        _put_values(out, v_cpu[pv, i] * (n / kv[i]), int(widths[i]), params.group_size)
    return out.getvalue()


def _put_values(out: bits.SectionWriter, values: torch.Tensor, width: int, group: int) -> None:
    if width >= 16:
        out.f16(values.numpy())
        return
    k = values.numel()
    padded = torch.zeros(-(-k // group) * group)
    padded[:k] = values
    codes, step = quantize_groups(padded.reshape(-1, group), width)
    out.f16(step.numpy())
    out.raw(bits.pack_uint(codes.reshape(-1)[:k].numpy(), width))


def _get_values(reader: bits.SectionReader, k: int, width: int, group: int) -> torch.Tensor:
    if width >= 16:
        return torch.from_numpy(reader.f16(k))
    groups = -(-k // group)
    step = torch.from_numpy(reader.f16(groups))
    codes = torch.zeros(groups * group, dtype=torch.int64)
    codes[:k] = torch.from_numpy(reader.codes(k, width))
    return dequantize(codes.reshape(groups, group), step, width).reshape(-1)[:k]


def decode(reader: bits.SectionReader, shape, params: Params, ctx) -> torch.Tensor:
    m, n = shape
    r = reader.uint(bits.count_width(min(m, n)))
    middle = LEGACY_MIDDLE
    if r == 0 and params.quant:  # the ImPart-Qt marker
        middle = reader.uint(1)
        if not 1 <= middle <= 8:
            raise ArtifactError(f"{reader.what}: middle tier of {middle} bits outside 1..8")
        r = reader.uint(bits.count_width(min(m, n)))
    if not 0 < r <= min(m, n):
        raise ArtifactError(f"{reader.what}: {r} components outside 1..{min(m, n)}")
    counts = [(reader.uint(bits.count_width(m)), reader.uint(bits.count_width(n))) for _ in range(r)]
    U = torch.zeros(m, r)
    V = torch.zeros(n, r)
    widths = component_bits(r, params, middle)
    for i, (ku, kv) in enumerate(counts):
        if not (0 < ku <= m and 0 < kv <= n):
            raise ArtifactError(f"{reader.what}: kept counts ({ku}, {kv}) out of range")
        U[torch.from_numpy(_positions(ctx, i, "u", m, ku)), i] = _get_values(reader, ku, int(widths[i]), params.group_size)
        V[torch.from_numpy(_positions(ctx, i, "v", n, kv)), i] = _get_values(reader, kv, int(widths[i]), params.group_size)
    reader.done()
    return (U.to(ctx.device) @ V.to(ctx.device).T)
