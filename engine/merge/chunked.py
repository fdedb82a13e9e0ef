"""Chunked CPU kernels for the deterministic task-vector methods, linear, slerp, model_stock,
nuslerp (flattened), multislerp, karcher, ram, ramplus_tl, nearswap and sce (without its
variance selection).

``linear`` and every task-arithmetic variant (engine/merge/gta.py's ``Variant`` declarations)
whose sparsification is none, magnitude or Breadcrumbs' magnitude_outliers (without
``rescale``), or DARE's random drop (with or without it), are elementwise once each model's
trim threshold or drop stream is known; the kernel reads the variant's
sparsification and consensus from its declaration, so a new such variant runs here unchanged. Computed over whole
tensors, every step (bf16 -> fp32, subtract, weight, elect, sum, cast back) streams the full
tensor through memory; computed over slices of ``CHUNK`` entries the fp32 temporaries stay in
the CPU cache, which is several times faster and never holds an fp32 copy of a whole tensor.

The arithmetic is the methods' own, step for step (``engine.merge.gta.combine``,
``engine.merge.methods.linear``), so results are the same; tests compare them. slerp takes two
passes: the norms and the dot product (float64 sums, as ``engine.merge.methods.slerp`` does
them), then the weighted sum of the two tensors with the method's own weights; so does
model_stock (the deltas' float64 Gram matrix, then t * mean + (1 - t) * base), and nuslerp and
multislerp (the vectors' float64 Gram matrix, from which the methods' own coefficient rules give
one weight per model, then sum_i k_i v_i, plus the base when there is one), and karcher (the
inputs' Gram matrix, its fixed-point iteration on one coefficient per input, then sum_i c_i W_i).
sce and ramplus_tl take a first pass for their per-model statistics (float64 sums of squared
deltas; integer counts of shared and unique changes), then compute each chunk with the
method's own functions; nearswap and ram need no first pass.

Trimming (TIES, Breadcrumbs) needs, per model, the k-th largest |delta| of the whole tensor.
It is found by selection, never a sort of the tensor: a seeded sample brackets the k-th value, one chunked
pass counts the entries above the bracket and collects the few inside it (numpy compacts them), and a sort of
those gives the exact threshold (a full ``kthvalue`` is the fallback should the bracket miss). The one pass
serves every model's thresholds (``select_many``): each chunk of the base is converted once.
Entries equal to the threshold are kept lowest flat index first, as ``sparsify.topk_mask`` does.

DARE's drops are the method's own draws: ``torch.rand`` of a CPU generator gives the same
stream drawn chunk by chunk in order as drawn at once, so each model's generator state where
its draws begin is all the kernel needs (a shared generator draws model after model: the state
where the next model begins is found by drawing this one's). The L1 rescale needs the sums of
|delta| and |kept delta| over the whole tensor: a first pass draws and sums (float64, as
``sparsify.apply_mask`` sums), the second draws again from the saved states and merges.

NaN/Inf are found by one sum per chunk of the values stored in the output (after the cast, while
the chunk is in cache, so the caller need not scan the output again). That sum also covers the
inputs: every kernel multiplies and adds the inputs' values themselves (masks and signs only
scale them, by 0 or 1 included, and NaN * 0 is NaN), so a NaN/Inf in any input leaves a NaN/Inf
in the result at that place. Only when the sum is not finite is anything looked at exactly:
the inputs (the error names the one holding a NaN/Inf), then the float32 result (recomputed for
a lower-precision output, to tell a float32 overflow, an error, from an overflow of the cast,
which the caller's ``overflow`` policy handles).

Large tensors of the heavy kernels (a trim or a sign election: several times the operations
per entry) are split into contiguous ranges of chunks computed by two threads at once (the
caller's and one helper; torch releases the GIL inside each operation): every chunk is computed
exactly as it would be alone, so the result is the same bit for bit. The trim masks allow it
because a TopK carries how many threshold ties lie before each chunk (from the selection pass),
so any chunk knows how many of its ties to keep without the chunks before it. The light kernels
(linear, plain task arithmetic, slerp) stay on one thread: a merge's reader and writer threads
keep the other core busy, and a second merge thread then only adds contention for the GIL (on a
loaded 2-core machine, 35% more CPU time for task arithmetic).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.errors import NonFiniteError
from engine.merge.gta import Variant
from engine.merge.methods import model_stock as stock_method
from engine.merge.methods import nearswap as nearswap_method
from engine.merge.methods import ram as ram_method
from engine.merge.methods import ramplus_tl as ramplus_method
from engine.merge.methods import sce as sce_method
from engine.merge.methods import slerp as slerp_method
from engine.merge.order_stats import band_of, bracket, kth_smallest
from engine.merge.registry import MergeMethod
from engine.merge.sparsify import kept_count

# 128Ki entries: a chunk's float32 temporaries (512 KiB each) mostly stay in a core's 2 MiB L2
# cache, and the two threads of a split tensor hand the GIL over half as often as at 64Ki (each
# operation releases it; at 64Ki the handovers cost what the second thread gives). Measured on
# an idle 2-core machine, the 270M triple's tensors through merge_into, median of 5: TIES 4.96 s
# at 1 << 17 vs 5.73 s at 1 << 16; task arithmetic 1.36 vs 1.34, linear 1.04 vs 1.05
CHUNK = 1 << 17
_SAMPLE = 1 << 15
SPLIT_MIN_CHUNKS = 8  # tensors of fewer chunks are computed by one thread
# a bound on every |result| below this share of the output dtype's largest finite value proves
# them all finite, in float32 and once cast (the float32 roundings of the bound's terms are far
# smaller than the margin)
PROVEN_FINITE = 0.5
_POOL: ThreadPoolExecutor | None = None

# the sparsifications the kernels implement (DELLA's rank-based drop stays whole-tensor)
SPARSIFICATIONS = (None, "magnitude", "magnitude_outliers", "random")
_RESCALE_EPS = 1e-7  # as engine.merge.sparsify


@dataclass(frozen=True)
class TopK:
    """The k largest |delta|: every entry above ``threshold`` plus the first ``at_keep`` entries
    equal to it (flat order). k >= n is ``everything``, k <= 0 ``nothing``. ``ties_before[c]``:
    entries equal to the threshold in chunks before chunk ``c`` (one more item at the end)."""

    threshold: float = 0.0
    at_keep: int = 0
    everything: bool = False
    nothing: bool = False
    ties_before: tuple[int, ...] = field(default=(), repr=False)
    # the float32 just below a positive threshold (a float64 nextafter would round back up)
    below: float = field(default=0.0, repr=False)


def _chunks(n: int, lo: int = 0, hi: int | None = None):
    """(start, end) of chunks lo..hi-1 of a flat tensor of n entries (all by default)."""
    hi = -(-n // CHUNK) if hi is None else hi
    for c in range(lo, hi):
        yield c * CHUNK, min(n, (c + 1) * CHUNK)


def workers() -> int:
    """Threads a large tensor is split over: two when this process may use two CPUs."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return 2 if cpus >= 2 else 1


def _split(n: int, fn, parallel: bool = True) -> list:
    """``fn(lo, hi)`` over ranges of the chunks of n entries: two halves on two threads for a
    large tensor (when ``parallel``), else one call here. Results in chunk order; the helper is
    always waited for (it writes into the caller's output), an error of either half raised."""
    count = -(-n // CHUNK)
    if not parallel or count < SPLIT_MIN_CHUNKS or workers() < 2:
        return [fn(0, count)]
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunked")
    mid = count // 2
    helper = _POOL.submit(fn, mid, count)
    try:
        first = fn(0, mid)
    except BaseException:
        helper.exception()  # wait: it writes into the caller's output
        raise
    return [first, helper.result()]


def _f32(t: torch.Tensor) -> torch.Tensor:
    """A private fp32 copy (``.float()`` of an fp32 tensor would be the caller's own memory)."""
    return t.to(torch.float32, copy=True)


def _delta_chunk(base: torch.Tensor, model: torch.Tensor, s: int, e: int) -> torch.Tensor:
    return _f32(model[s:e]).sub_(base[s:e].float())


def select_topk(base: torch.Tensor, model: torch.Tensor, k: int) -> TopK:
    """The k-th largest |model - base| over flat 1-D views, by bracketing + selection."""
    return select_many(base, [(model, k)])[0]


def _bracket_of(base: torch.Tensor, model: torch.Tensor, k: int) -> tuple[float, float]:
    """Bounds around the k-th largest |model - base| from a seeded sample of the entries."""
    n = base.numel()
    m = min(n, _SAMPLE)
    g = torch.Generator().manual_seed(n * 1_000_003 + k)
    # the indices in ascending order: the gather then walks the (freshly read, cold) tensors
    # front to back instead of missing the cache at random; numpy's sort is ~10x torch's here
    idx = torch.from_numpy(np.sort(torch.randint(0, n, (m,), generator=g).numpy()))
    sample = torch.from_numpy(np.sort((model.index_select(0, idx).float()
                                       - base.index_select(0, idx).float()).abs_().numpy()))
    return bracket(sample, 1 - k / n)  # around the k-th largest: ascending rank n - k


def select_many(base: torch.Tensor, requests: Sequence[tuple[torch.Tensor, int]]) -> list[TopK]:
    """``select_topk(base, model, k)`` for each (model, k), in one chunked pass over the tensors.

    The pass converts each chunk of the base once for every model, and each model's |delta|
    once for every k asked of it (Breadcrumbs asks two of each model): per entry, the
    conversions and the subtraction cost as much as collecting a band, so a pass per request
    would do most of the work again. Every request's result is what it would be alone."""
    n = base.numel()
    out: list[TopK | None] = [None] * len(requests)
    models: list[torch.Tensor] = []  # distinct models (by identity), in order
    asks: list[list[tuple[int, float, float]]] = []  # per model: (request, lo, hi)
    for j, (model, k) in enumerate(requests):
        if k >= n:
            out[j] = TopK(everything=True)
            continue
        if k <= 0:
            out[j] = TopK(nothing=True)
            continue
        at = next((i for i, m in enumerate(models) if m is model), None)
        if at is None:
            models.append(model)
            asks.append([])
            at = len(models) - 1
        asks[at].append((j, *_bracket_of(base, model, k)))
    if not models:
        return out

    def scan(c_lo: int, c_hi: int):
        below = [0] * len(requests)
        bands: list[list[torch.Tensor]] = [[] for _ in requests]
        # rows reused chunk after chunk: the base, one model's |delta|, band_of's scratch
        buffers = torch.empty((4, min(n, CHUNK)), dtype=torch.float32)
        db, dm, scratch = buffers[0], buffers[1], buffers[2:]
        for s, e in _chunks(n, c_lo, c_hi):
            b = db[:e - s].copy_(base[s:e])
            for model, wanted in zip(models, asks):
                mag = dm[:e - s].copy_(model[s:e]).sub_(b).abs_()
                for j, lo, hi in wanted:
                    count, entries = band_of(mag, lo, hi, scratch)  # entries: a copy, not the buffer
                    below[j] += count
                    bands[j].append(entries)
        return below, bands

    parts = _split(n, scan)
    for wanted in asks:
        for j, _, _ in wanted:
            out[j] = _threshold(base, requests[j][0], requests[j][1],
                                sum(part[0][j] for part in parts), [b for part in parts for b in part[1][j]])
    return out


def _threshold(base: torch.Tensor, model: torch.Tensor, k: int, below: int, bands: list[torch.Tensor]) -> TopK:
    """The TopK from the selection pass: ``below`` entries under the bracket, ``bands`` the
    entries inside it, one per chunk in order."""
    n = base.numel()
    band = torch.cat(bands)
    above = n - below - band.numel()  # entries above hi (and any NaN)
    rank = k - above  # rank of the k-th largest inside the band, from the top (1-based)
    count = len(bands)
    if 1 <= rank <= band.numel():
        threshold = float(kth_smallest(band, band.numel() - rank + 1))
        values = band.numpy()  # numpy: its comparisons and cumsum are ~5x torch's on the CPU
        at_threshold = values == np.float32(threshold)
        greater = above + int(np.count_nonzero(values > np.float32(threshold)))
        # ties in chunks 0..c: the running count of band entries equal to the threshold, read
        # at the end of each chunk's band (0 while no band entry has been seen yet)
        ends = np.cumsum([b.numel() for b in bands])
        running = np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(at_threshold, dtype=np.int64)])
        ties = torch.from_numpy(running[ends])
    else:  # the bracket missed (heavy ties or an unlucky sample): exact selection on everything
        mag = torch.cat([_delta_chunk(base, model, s, e).abs_() for s, e in _chunks(n)])
        threshold = float(torch.kthvalue(mag, n - k + 1).values)
        greater = int((mag > threshold).sum())
        at = torch.nonzero(mag == threshold).flatten() // CHUNK
        ties = torch.bincount(at, minlength=count).cumsum(0)
    below = float(torch.nextafter(torch.tensor(threshold, dtype=torch.float32), torch.tensor(0.0)))
    return TopK(threshold=threshold, at_keep=k - greater, ties_before=(0, *ties.tolist()), below=below)


def topk_mask(rule: TopK, mag: torch.Tensor, c: int) -> torch.Tensor | None:
    """The keep mask of chunk ``c`` (its |delta| ``mag``) under ``rule``; None keeps all.

    Masks are float 0/1 tensors built with sign arithmetic (``sign(mag - t)`` is 1 above the
    threshold, 0 at it): on the CPU, comparisons producing bool tensors and bool-float products
    are several times slower than these float operations, and the values are the same. Of the
    entries equal to the threshold, those kept are the first ``at_keep`` in flat order: this
    chunk keeps what is left of them after the ties of the chunks before it."""
    if rule.everything:
        return None
    if rule.nothing:
        return torch.zeros_like(mag)
    keep = (mag - rule.threshold).sign_()  # -1 below, 0 at, +1 above the threshold
    left = rule.at_keep - rule.ties_before[c]
    count = rule.ties_before[c + 1] - rule.ties_before[c]  # ties in this chunk
    if left <= 0 or count == 0:
        return keep.clamp_(min=0)
    at = keep.abs().neg_().add_(1.0)  # 1 exactly at the threshold
    keep.clamp_(min=0)
    if count <= left:
        return keep.add_(at)
    at_b = at.bool()  # the chunk holding the cut: keep the first `left` ties, in flat order
    return keep.add_((at_b & (torch.cumsum(at_b, dim=0) <= left)).to(keep.dtype))


def _model_requests(sparsification, n: int, mp) -> list[tuple[int, bool]] | None:
    """[(k, negate)]: the top-k rules whose AND is the keep mask; None keeps everything."""
    density = getattr(mp, "density", 1.0)
    if sparsification is None or density >= 1:
        return None
    target = kept_count(density, n)
    if sparsification == "magnitude":
        return [(target, False)]
    n_top = int(mp.gamma * n)
    n_bottom = n - target - n_top
    if n_bottom < 0:
        n_top += n_bottom
        n_bottom = 0
    return [(n - n_bottom, False), (n_top, True)]


def _model_rules(sparsification, n: int, model_params, base, models) -> list[list[tuple[TopK, bool]] | None]:
    """Per model, [(rule, negate)] whose AND is its keep mask (None keeps everything); every
    model's thresholds are found in one selection pass."""
    wanted = [_model_requests(sparsification, n, mp) for mp in model_params]
    flat = [(m, k) for m, asks in zip(models, wanted) for k, _ in (asks or ())]
    found = iter(select_many(base, flat) if flat else ())
    return [None if asks is None else [(next(found), negate) for _, negate in asks] for asks in wanted]


def supports(method: MergeMethod, params, n_models: int | None = None) -> bool:
    """Whether ``merge_into`` implements this method with these global parameters (and this
    many fine-tuned tensors, when given)."""
    if method.name == "linear":
        return True
    if method.name == "slerp":
        return n_models in (None, 1)
    if method.name == "model_stock":
        return not params.filter_wise and n_models is not None and n_models >= 2
    if method.name == "nuslerp":  # the whole tensor as one vector (per-row angles stay whole)
        return params.nuslerp_flatten and n_models in (None, 2)
    if method.name == "multislerp":
        return n_models is None or n_models >= 2
    if method.name == "karcher":  # its iteration on N coefficients, from the Gram matrix
        return n_models is None or n_models >= 2
    if method.name == "ram":  # elementwise once each entry's count of changing models is known
        return True
    if method.name == "ramplus_tl":  # ram's, once each model's overlap counts are known
        return True
    if method.name == "nearswap":  # elementwise
        return n_models in (None, 1)
    if method.name == "sce":  # elementwise once the size weights are known; the variance
        return params.select_topk >= 1  # selection (select_topk < 1) takes the whole tensor
    variant = method.module
    return (isinstance(variant, Variant) and variant.sparsification in SPARSIFICATIONS
            and (not params.rescale or variant.sparsification == "random"))


def merge_into(method: MergeMethod, base: torch.Tensor | None, models: Sequence[torch.Tensor],
               model_params, params, out: torch.Tensor, *, labels: Sequence[str] | None = None,
               name: str = "", generator: torch.Generator | None = None) -> torch.Tensor:
    """Merge one tensor chunk by chunk into ``out`` (any float dtype, the inputs' shape).

    ``labels`` name the inputs in errors (base first when there is one); ``generator`` is the
    tensor's shared generator of the random methods (``MergeSpec.generator``)."""
    merge_checked(method, base, models, model_params, params, out, labels=labels, name=name,
                  generator=generator)
    return out


def merge_checked(method: MergeMethod, base: torch.Tensor | None, models: Sequence[torch.Tensor],
                  model_params, params, out: torch.Tensor, *, labels: Sequence[str] | None = None,
                  name: str = "", generator: torch.Generator | None = None) -> bool:
    """``merge_into``; True when every value written is known finite in ``out``'s dtype (the
    cast checked on the fly), False when the sums cannot tell (a huge finite sum overflows, or
    a cast overflowed): the caller then looks at ``out`` exactly."""
    flat_models = [m.reshape(-1) for m in models]
    flat_base = base.reshape(-1) if base is not None else None
    flat_out = out.view(-1)
    n = flat_out.numel()
    inputs = ([flat_base] if flat_base is not None else []) + flat_models
    labels = list(labels) if labels is not None else (
        (["base"] if base is not None else []) + [f"input {i}" for i in range(len(models))])
    cast = out.dtype != torch.float32
    # One thread per range: the chunks are small, in-cache operations, where intra-op threads
    # cost more than they give (and collapse when other processes share the cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rules, consensus, drops = [], None, None
    heavy = None  # two threads for a large tensor: decided by the method's branch, or below
    try:
        if method.name == "linear":
            w = [float(x) for x in torch.tensor([mp.weight for mp in model_params], dtype=torch.float32)]
            total = float(torch.tensor(w, dtype=torch.float32).sum())

            def run(target, lo, hi):
                return _linear(flat_models, w, total, params.normalize, target, lo, hi)
        elif method.name == "slerp":
            (model,) = flat_models
            reduced = sum(_split(n, lambda lo, hi: _slerp_sums(flat_base, model, lo, hi), parallel=False))
            n0, n1, d01 = math.sqrt(reduced[0]), math.sqrt(reduced[1]), float(reduced[2])
            w0, w1 = (slerp_method.weights(params.t, n0, n1, d01, params.dot_threshold, params.eps)
                      if bool(torch.isfinite(reduced).all()) else (math.nan, math.nan))

            # |w0 b + w1 m| <= |w0| |b|_2 + |w1| |m|_2 entry by entry: far below the largest
            # finite float (bf16's too), every result is finite and is not summed to check it
            bound = abs(w0) * n0 + abs(w1) * n1
            largest = min(torch.finfo(out.dtype).max, torch.finfo(torch.float32).max)  # (fp32 arithmetic)
            proven = math.isfinite(bound) and bound < PROVEN_FINITE * largest

            def run(target, lo, hi):
                return _slerp(flat_base, model, w0, w1, target, lo, hi, check=not proven)
        elif method.name == "model_stock":
            gram = sum(_split(n, lambda lo, hi: _stock_gram(flat_base, flat_models, lo, hi), parallel=False))
            t = stock_method.stock_t(gram.unsqueeze(0), len(flat_models)).to(torch.float32).reshape(())
            one_minus_t = 1 - t

            def run(target, lo, hi):
                return _stock(flat_base, flat_models, t, one_minus_t, target, lo, hi)
        elif method.name == "ram":
            def run(target, lo, hi):
                return _ram(flat_base, flat_models, params.epsilon, target, lo, hi)
        elif method.name == "ramplus_tl":
            # first pass: each model's shared and unique changed entries (integer counts, the
            # same summed over chunks as over the whole tensor); then ram's sum with the scales
            counts = sum(_split(n, lambda lo, hi: _overlap_counts(flat_base, flat_models, params.epsilon,
                                                                  lo, hi)))
            scales = ramplus_method.scales_from_counts(counts, params.r, params.alpha, params.epsilon,
                                                       torch.float32)
            heavy = True  # two passes of ram's split: two threads pay (8.3 vs 8.8 s on one)

            def run(target, lo, hi):
                return _ram(flat_base, flat_models, params.epsilon, target, lo, hi, scales)
        elif method.name == "nearswap":
            (model,) = flat_models

            def run(target, lo, hi):
                return _nearswap(flat_base, model, params.t, target, lo, hi)
        elif method.name == "sce":
            # first pass: each model's float64 sum of squared deltas (its size weight); then
            # the sign election and the weighted mean of the agreeing deltas, chunk by chunk
            sums = sum(_split(n, lambda lo, hi: _square_sums(flat_base, flat_models, lo, hi), parallel=False))
            weights = sce_method.weights_from_square_sums(sums, n, torch.float32)
            heavy = True  # a sign election per chunk, as TIES'

            def run(target, lo, hi):
                return _sce(flat_base, flat_models, weights, target, lo, hi)
        elif method.name in ("nuslerp", "multislerp"):
            # first pass: the float64 Gram matrix of the vectors (task vectors over a base, else
            # the weights); then one combination sum_i k_i v_i (+ base) with the method's own
            # coefficients, formed from the Gram matrix (engine.merge.methods.nuslerp/multislerp)
            gram = sum(_split(n, lambda lo, hi: _gram(flat_base, flat_models, lo, hi), parallel=False))
            weights = [float(mp.weight) for mp in model_params]
            if not bool(torch.isfinite(gram).all()):
                coeffs = [math.nan] * len(flat_models)
            elif method.name == "nuslerp":
                t = method.module.interpolation_factor(*weights)
                coeffs = method.module.flat_coefficients(t, float(gram[0, 0]), float(gram[1, 1]),
                                                         float(gram[0, 1]))
            else:
                coeffs = method.module.gram_coefficients(gram, weights, params).tolist()
            coeffs = [float(torch.tensor(c, dtype=torch.float32)) for c in coeffs]  # applied in fp32

            def run(target, lo, hi):
                return _combine(flat_base, flat_models, coeffs, target, lo, hi)
        elif method.name == "karcher":
            # the base, when given, is one more input, last (as engine.merge.methods.karcher)
            points = flat_models + ([flat_base] if flat_base is not None else [])
            gram = sum(_split(n, lambda lo, hi: _gram(None, points, lo, hi), parallel=False))
            coeffs = ([math.nan] * len(points) if not bool(torch.isfinite(gram).all()) else
                      method.module.gram_coefficients(gram, params.max_iter, params.tol).tolist())
            coeffs = [float(torch.tensor(c, dtype=torch.float32)) for c in coeffs]  # applied in fp32

            def run(target, lo, hi):
                return _combine(None, points, coeffs, target, lo, hi)
        else:
            variant = method.module
            consensus = params.consensus_method if variant.consensus else None
            if variant.sparsification == "random":
                drops = _dare_drops(flat_base, flat_models, model_params, params, generator, name)
            else:
                drops = None
                rules = _model_rules(variant.sparsification, n, model_params, flat_base, flat_models)

            def run(target, lo, hi):
                for drop in drops or ():
                    if drop is not None:
                        drop.rewind()  # a pass covers every chunk, in order, on one thread
                return _gta(flat_base, flat_models, model_params, params, target, rules, consensus, lo, hi,
                            drops=drops)
        # DARE's drops come from sequential streams: one thread
        if heavy is None:
            heavy = (consensus is not None or any(r is not None for r in rules)) and drops is None
        stored = sum(_split(n, lambda lo, hi: run(flat_out, lo, hi), parallel=heavy))
        if bool(torch.isfinite(stored)):
            return True
        # a NaN/Inf somewhere, or only a huge sum: look exactly
        for label, t in zip(labels, inputs):
            finite = torch.isfinite(t)
            if not bool(finite.all()):
                raise NonFiniteError(f"{int((~finite).sum())} NaN/Inf value(s) in an input; merge refused",
                                     path=label, tensor=name or None)
        result = flat_out
        if cast:  # the float32 values, before the cast
            result = torch.empty(n, dtype=torch.float32)
            run(result, 0, -(-n // CHUNK))
        bad = int((~torch.isfinite(result)).sum())
        if bad:
            raise NonFiniteError(f"{method.name} produced {bad} non-finite value(s)", tensor=name or None)
        return not cast  # float32: all finite; a cast: the caller looks at its values
    finally:
        torch.set_num_threads(threads)


def _store(result: torch.Tensor, out: torch.Tensor, s: int, e: int, acc: torch.Tensor) -> None:
    """Store a chunk's float32 result in ``out`` (cast to its dtype); add up what was stored."""
    out[s:e].copy_(result)  # a slice assignment costs ~50% more (its indexing machinery)
    acc += result.sum() if out.dtype == torch.float32 else out[s:e].sum(dtype=torch.float32)


def _scratch(rows: int, out: torch.Tensor) -> torch.Tensor:
    """``rows`` float32 chunk buffers, reused chunk after chunk: a fresh tensor per operation
    costs more than the operation itself at this size (allocation and first touch of its
    pages); the kernels write every entry they read back."""
    return torch.empty((rows, min(out.numel(), CHUNK)), dtype=torch.float32)


def _linear(models, weights, total, normalize, out, lo, hi) -> torch.Tensor:
    acc = torch.zeros((), dtype=torch.float32)
    buf = _scratch(2, out)
    for s, e in _chunks(out.numel(), lo, hi):
        mixed = None
        for m, wi in zip(models, weights):
            x = buf[0 if mixed is None else 1, :e - s].copy_(m[s:e]).mul_(wi)
            mixed = x if mixed is None else mixed.add_(x)
        if normalize and total != 1.0:  # x / 1 is x, bit for bit (NaN, Inf and -0 too)
            mixed = mixed.div_(total)
        _store(mixed, out, s, e, acc)
    return acc


def _trim(d: torch.Tensor, rs: list[tuple[TopK, bool]], c: int) -> torch.Tensor:
    """``d`` with the entries its rules drop set to 0 (chunk ``c``).

    A single top-k rule whose chunk keeps all or none of its threshold ties is one
    ``hardshrink`` (|d| > lambda kept, else 0: the threshold itself, or the float32 just below
    it to keep the ties), a fifth of the operations of building and applying a 0/1 mask; the
    chunk holding the cut, and Breadcrumbs' pair of rules, apply ``topk_mask``'s masks."""
    if len(rs) == 1 and not rs[0][1]:
        rule = rs[0][0]
        if rule.everything:
            return d
        if rule.nothing:
            return d.zero_()
        left = rule.at_keep - rule.ties_before[c]
        count = rule.ties_before[c + 1] - rule.ties_before[c]
        if left <= 0 or count == 0:  # no tie kept here: |d| > threshold
            return torch.hardshrink(d, rule.threshold, out=d)  # in place: no fresh chunk
        if count <= left and rule.threshold > 0:  # every tie here is kept: |d| >= threshold,
            return torch.hardshrink(d, rule.below, out=d)  # i.e. |d| > the float32 just below it
    mag = d.abs()
    for rule, negate in rs:
        k = topk_mask(rule, mag, c)  # float 0/1, None = keep all
        if negate:
            k = torch.zeros_like(mag) if k is None else k.neg_().add_(1.0)
        if k is not None:
            d = d.mul_(k)
    return d


def _gta(base, models, model_params, params, out, rules, consensus, lo, hi, drops=None) -> torch.Tensor:
    """Task arithmetic and its trim / drop / sign-election variants over chunks lo..hi-1.

    The sign election is computed as s * sum_i relu(s * w_i d_i) with the elected sign s
    (+1 / -1): relu(s * x) is |x| where x agrees with s and 0 elsewhere, so this is the sum of
    the agreeing weighted deltas exactly (negation is exact), in two operations per model
    instead of a sign, a mask and two products."""
    weights = [float(x) for x in torch.tensor([mp.weight for mp in model_params], dtype=torch.float32)]
    w_sum = torch.tensor(weights, dtype=torch.float32).sum()
    plain_divisor = 1.0 if abs(float(w_sum)) < 1e-8 else w_sum
    positive = all(w > 0 for w in weights)  # a non-zero divisor is then >= min(w) > 0
    lam = params.lambda_
    acc = torch.zeros((), dtype=torch.float32)
    # rows: the base's chunk (then the result), the election's sums (then the elected signs),
    # the agreeing deltas' sum, one delta per model
    bb, tb, mb, *scratch = _scratch(3 + len(models), out)
    for c, (s, e) in enumerate(_chunks(out.numel(), lo, hi), start=lo):
        b = bb[:e - s].copy_(base[s:e])
        weighted = []
        for i, (m, wi) in enumerate(zip(models, weights)):
            d = scratch[i][:e - s].copy_(m[s:e]).sub_(b)
            if drops is not None and drops[i] is not None:
                d = drops[i].apply(d)
            if rules and rules[i] is not None:
                d = _trim(d, rules[i], c)
            weighted.append(d.mul_(wi))
        if consensus is not None:
            total = tb[:e - s]
            if consensus == "sum":
                (torch.add(weighted[0], weighted[1], out=total) if len(weighted) > 1
                 else total.copy_(weighted[0]))
                for wd in weighted[2:]:
                    total.add_(wd)
            else:
                torch.sign(weighted[0], out=total)
                for wd in weighted[1:]:
                    total.add_(torch.sign(wd))
            elected = total.sign_().add_(0.5).sign_()  # zero counts as positive: +1 / -1
            agreeing = [wd.mul_(elected).clamp_(min=0) for wd in weighted]  # |w_i d_i| where it agrees
            mixed = (torch.add(agreeing[0], agreeing[1], out=mb[:e - s]) if len(agreeing) > 1
                     else mb[:e - s].copy_(agreeing[0]))
            for a in agreeing[2:]:
                mixed.add_(a)
            # divisor: sum_i w_i [agrees], in the delta rows (each agreeing delta is in mixed now)
            divisor = agreeing[0].sign_().mul_(weights[0])
            for a, wi in zip(agreeing[1:], weights[1:]):
                divisor.add_(a.sign_(), alpha=wi)  # w_i * 1 or w_i * 0: exact, as a product
            mixed.mul_(elected)
            if positive:  # 0 -> a tiny value: its numerator is 0 too
                divisor = divisor.clamp_(min=torch.finfo(torch.float32).tiny)
            else:
                divisor = divisor.add_(divisor.sign().abs_().neg_().add_(1.0))  # 0 -> 1
        else:
            mixed = weighted[0]
            for wd in weighted[1:]:
                mixed = mixed.add_(wd)
            divisor = plain_divisor
        if params.normalize and lam == 1.0 and isinstance(divisor, torch.Tensor):
            result = b.addcdiv_(mixed, divisor)  # b + mixed / divisor, one pass (1 * x is exact)
        else:
            if params.normalize:
                mixed = mixed.div_(divisor)
            result = b.add_(mixed.mul_(lam)) if lam != 1.0 else b.add_(mixed)
        _store(result, out, s, e, acc)
    return acc


def _slerp_sums(base, model, lo, hi) -> torch.Tensor:
    """float64 [sum b*b, sum m*m, sum b*m] over chunks lo..hi-1 (NaN/Inf propagate)."""
    sums = torch.zeros(3, dtype=torch.float64)
    rows = torch.empty((2, min(base.numel(), CHUNK)), dtype=torch.float64)  # reused (see _scratch)
    for s, e in _chunks(base.numel(), lo, hi):
        x, y = rows[0, :e - s].copy_(base[s:e]), rows[1, :e - s].copy_(model[s:e])
        sums[0] += torch.dot(x, x)
        sums[1] += torch.dot(y, y)
        sums[2] += torch.dot(x, y)
    return sums


def _slerp(base, model, w0, w1, out, lo, hi, check: bool = True) -> torch.Tensor:
    """w0 * base + w1 * model over chunks lo..hi-1; unless ``check``, the results are known to
    be finite and are stored without summing them."""
    acc = torch.zeros((), dtype=torch.float32)
    x, y = _scratch(2, out)
    for s, e in _chunks(out.numel(), lo, hi):
        mixed = x[:e - s].copy_(base[s:e]).mul_(w0).add_(y[:e - s].copy_(model[s:e]).mul_(w1))
        if check:
            _store(mixed, out, s, e, acc)
        else:
            out[s:e].copy_(mixed)
    return acc


def _stock_gram(base, models, lo, hi) -> torch.Tensor:
    """float64 [N, N]: sums over chunks lo..hi-1 of d_i * d_j (float32 deltas)."""
    gram = torch.zeros(len(models), len(models), dtype=torch.float64)
    for s, e in _chunks(base.numel(), lo, hi):
        b = _f32(base[s:e])
        d = torch.stack([_f32(m[s:e]).sub_(b) for m in models]).double()
        gram += d @ d.T
    return gram


def _stock(base, models, t, one_minus_t, out, lo, hi) -> torch.Tensor:
    acc = torch.zeros((), dtype=torch.float32)
    for s, e in _chunks(out.numel(), lo, hi):
        mean = torch.stack([_f32(m[s:e]) for m in models]).mean(dim=0)
        _store((t * mean).add_(one_minus_t * _f32(base[s:e])), out, s, e, acc)
    return acc


def _ram(base, models, epsilon, out, lo, hi, unique_scale=None) -> torch.Tensor:
    """RAM per chunk, as ``engine.merge.methods.ram`` computes it over the whole tensor (RAM+
    with each model's ``unique_scale``)."""
    acc = torch.zeros((), dtype=torch.float32)
    for s, e in _chunks(out.numel(), lo, hi):
        b = _f32(base[s:e])
        _store(ram_method.combine(b, ram_method.split(b, [m[s:e].float() for m in models], epsilon),
                                  unique_scale), out, s, e, acc)
    return acc


def _overlap_counts(base, models, epsilon, lo, hi) -> torch.Tensor:
    """int64 [2, N]: RAM+'s per-model shared and unique changed entries over chunks lo..hi-1."""
    counts = torch.zeros((2, len(models)), dtype=torch.int64)
    for s, e in _chunks(base.numel(), lo, hi):
        b = _f32(base[s:e])
        counts += ramplus_method.overlap_counts(ram_method.split(b, [m[s:e].float() for m in models], epsilon))
    return counts


def _nearswap(base, model, t, out, lo, hi) -> torch.Tensor:
    acc = torch.zeros((), dtype=torch.float32)
    for s, e in _chunks(out.numel(), lo, hi):
        _store(nearswap_method.combine(_f32(base[s:e]), _f32(model[s:e]), t), out, s, e, acc)
    return acc


def _sce_deltas(base, models, s, e) -> tuple[torch.Tensor, torch.Tensor]:
    b = _f32(base[s:e])
    return b, torch.stack([m[s:e].float() for m in models]).sub_(b)


def _square_sums(base, models, lo, hi) -> torch.Tensor:
    """float64 [N]: SCE's per-model sums of squared deltas over chunks lo..hi-1."""
    sums = torch.zeros(len(models), dtype=torch.float64)
    for s, e in _chunks(base.numel(), lo, hi):
        sums += sce_method.square_sums(_sce_deltas(base, models, s, e)[1])
    return sums


def _sce(base, models, weights, out, lo, hi) -> torch.Tensor:
    acc = torch.zeros((), dtype=torch.float32)
    for s, e in _chunks(out.numel(), lo, hi):
        _store(sce_method.erase_and_merge(*_sce_deltas(base, models, s, e), weights), out, s, e, acc)
    return acc


def _gram(base, models, lo, hi) -> torch.Tensor:
    """float64 [N, N]: sums over chunks lo..hi-1 of v_i * v_j, v_i the model's float32 delta
    over ``base``, or the model itself without one."""
    gram = torch.zeros(len(models), len(models), dtype=torch.float64)
    for s, e in _chunks(models[0].numel(), lo, hi):
        if base is None:
            v = torch.stack([m[s:e].to(torch.float32) for m in models]).double()
        else:
            b = _f32(base[s:e])
            v = torch.stack([_f32(m[s:e]).sub_(b) for m in models]).double()
        gram += v @ v.T
    return gram


def _combine(base, models, coeffs, out, lo, hi) -> torch.Tensor:
    """out = sum_i k_i v_i (+ base), v_i as in ``_gram``, in float32 chunk by chunk."""
    acc = torch.zeros((), dtype=torch.float32)
    buf = _scratch(3, out)
    for s, e in _chunks(out.numel(), lo, hi):
        b = buf[0, :e - s].copy_(base[s:e]) if base is not None else None
        mixed = None
        for m, k in zip(models, coeffs):
            v = buf[1 if mixed is None else 2, :e - s].copy_(m[s:e])
            if b is not None:
                v.sub_(b)
            v.mul_(k)
            mixed = v if mixed is None else mixed.add_(v)
        _store(b.add_(mixed) if b is not None else mixed, out, s, e, acc)
    return acc


class _Drop:
    """One model's DARE drop, replayed chunk by chunk: its generator from the state where its
    draws begin, its density, its rescale (``apply_mask``'s, the factor known in advance)."""

    def __init__(self, state: torch.Tensor, density: float, rescale: str | None, factor):
        self.state, self.generator = state, torch.Generator()
        self.density, self.rescale, self.factor = density, rescale, factor
        self.rewind()

    def rewind(self) -> None:
        """Back to where this model's draws begin (before each pass over the tensor)."""
        self.generator.set_state(self.state)

    def apply(self, d: torch.Tensor) -> torch.Tensor:
        # the draws compared in place as floats (1.0 kept / 0.0 dropped; a bool-valued
        # comparison costs ~4x more on the CPU): the same products as with a bool mask
        keep = torch.rand(d.numel(), generator=self.generator).lt_(self.density)
        masked = d.mul_(keep)
        if self.rescale == "keep_probability":
            return masked.div_(self.density)
        if self.rescale == "l1" and self.factor is not None:
            return masked.mul_(self.factor)
        return masked


def _dare_drops(base, models, model_params, params, shared, name) -> list[_Drop | None]:
    """Each model's drop as ``gta.merge`` draws it (``common.generator_for``), found by a first
    pass: it advances a shared generator past each model's draws and, for the L1 rescale, sums
    |delta| and |kept delta| in float64."""
    from engine.merge.common import generator_for

    n = base.numel()
    rescale = params.rescale_norm if params.rescale else None
    drops: list[_Drop | None] = []
    for i, (m, mp) in enumerate(zip(models, model_params)):
        density = getattr(mp, "density", 1.0)
        if density >= 1:  # the method returns the delta untouched, drawing nothing
            drops.append(None)
            continue
        gen = generator_for(i, getattr(mp, "seed", None), shared, name)
        state = gen.get_state()
        factor = None
        if rescale == "l1" or gen is shared:  # the stream must be drawn (to sum, or to pass it)
            before = after = 0.0
            for s, e in _chunks(n):
                keep = torch.rand(e - s, generator=gen).lt_(density)
                if rescale == "l1":
                    d = _f32(m[s:e]).sub_(base[s:e].float())
                    before += float(d.abs().sum(dtype=torch.float64))
                    after += float(d.mul_(keep).abs_().sum(dtype=torch.float64))
            if rescale == "l1" and before >= _RESCALE_EPS and after >= _RESCALE_EPS:
                factor = torch.tensor(before / after, dtype=torch.float64)
        drops.append(_Drop(state, density, rescale, factor))
    return drops
