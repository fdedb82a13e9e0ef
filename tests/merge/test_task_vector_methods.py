"""task_arithmetic, ties, dare_*, breadcrumbs*, della* against a plain float64 reference.

The reference works entry by entry on Python floats: masks are rebuilt independently (sorting
for magnitude trims, the documented seeded draw for random ones), then rescale, weighting,
sign election and the disjoint mean are spelled out.
"""

import pytest
import torch

from engine.merge import get_method
from tests.merge.helpers import family, seeded_uniform

NAME = "model.layers.1.mlp.up_proj.weight"


def reference(base, fts, weights, *, keep=None, probs=None, rescale=None, consensus=None, normalize=False, lam=1.0):
    b = base.double().flatten().tolist()
    deltas = []
    for i, ft in enumerate(fts):
        d = [x - y for x, y in zip(ft.double().flatten().tolist(), b)]
        if keep is not None:
            kept = [x if k else 0.0 for x, k in zip(d, keep[i])]
            if rescale == "l1":
                before, after = sum(abs(x) for x in d), sum(abs(x) for x in kept)
                if before >= 1e-7 and after >= 1e-7:
                    kept = [x * before / after for x in kept]
            elif rescale == "keep_probability":
                kept = [x / p for x, p in zip(kept, probs[i])]
            d = kept
        deltas.append(d)
    out = []
    for j in range(len(b)):
        vals = [w * d[j] for w, d in zip(weights, deltas)]
        if consensus:
            s = sum(vals) if consensus == "sum" else sum((v > 0) - (v < 0) for v in vals)
            positive = s >= 0
            use = [v != 0 and (v > 0) == positive for v in vals]
            num = sum(v for v, u in zip(vals, use) if u)
            den = sum(w for w, u in zip(weights, use) if u) or 1.0
        else:
            num, den = sum(vals), sum(weights)
            den = den if abs(den) >= 1e-8 else 1.0
        out.append(b[j] + lam * (num / den if normalize else num))
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


def top_magnitude(base, ft, density):
    d = (ft.double() - base.double()).flatten().tolist()
    k = max(1, int(density * len(d)))
    top = set(sorted(range(len(d)), key=lambda j: -abs(d[j]))[:k])
    return [j in top for j in range(len(d))]


def breadcrumb_keep(base, ft, density, gamma):
    d = (ft.double() - base.double()).flatten().tolist()
    n = len(d)
    target, n_top = int(density * n), int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top, n_bot = n_top + n_bot, 0
    kept = set(sorted(range(n), key=lambda j: abs(d[j]))[n_bot : n - n_top])
    return [j in kept for j in range(n)]


def della_probs(base, ft, density, eps):
    d = ft.double() - base.double()
    probs = []
    for row in d.tolist():
        order = sorted(range(len(row)), key=lambda j: abs(row[j]))
        p = [0.0] * len(row)
        for rank, j in enumerate(order):
            p[j] = density - eps + 2 * eps * rank / (len(row) - 1)
        probs.extend(p)
    return probs


def run(name, base, fts, mps, params=None, **kw):
    return get_method(name).merge(base, fts, mps, params or {}, name=NAME, **kw).double()


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6)


WEIGHTS = [1.0, 0.5, 2.0]


def test_task_arithmetic():
    base, fts = family()
    w = [0.3, -0.5, 1.2]
    mps = [{"weight": x} for x in w]
    close(run("task_arithmetic", base, fts, mps, {"lambda": 0.8}), reference(base, fts, w, lam=0.8))
    close(run("task_arithmetic", base, fts, mps, {"normalize": True}), reference(base, fts, w, normalize=True))


@pytest.mark.parametrize("params", [{}, {"lambda": 0.7, "normalize": False}, {"consensus_method": "count"}, {"rescale": True}])
def test_ties(params):
    base, fts = family()
    dens = [0.5, 0.3, 0.8]
    keep = [top_magnitude(base, ft, k) for ft, k in zip(fts, dens)]
    mps = [{"weight": w, "density": k} for w, k in zip(WEIGHTS, dens)]
    expected = reference(
        base, fts, WEIGHTS, keep=keep, consensus=params.get("consensus_method", "sum"),
        normalize=params.get("normalize", True), lam=params.get("lambda", 1.0), rescale="l1" if params.get("rescale") else None,
    )
    close(run("ties", base, fts, mps, params), expected)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("rescale_norm", ["l1", "keep_probability"])
def test_dare(name, rescale_norm):
    base, fts = family(shape=(8, 6))
    dens, seeds = [0.5, 0.6, 0.7], [11, 12, 13]
    keep = [(seeded_uniform(s, NAME, base.shape) < k).flatten().tolist() for s, k in zip(seeds, dens)]
    probs = [[k] * base.numel() for k in dens]
    mps = [{"weight": w, "density": k, "seed": s} for w, k, s in zip(WEIGHTS, dens, seeds)]
    consensus = "sum" if name == "dare_ties" else None
    expected = reference(base, fts, WEIGHTS, keep=keep, probs=probs, rescale=rescale_norm, consensus=consensus)
    close(run(name, base, fts, mps, {"rescale_norm": rescale_norm}), expected)


@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs(name):
    base, fts = family(shape=(6, 5))
    dens, gammas = [0.6, 0.5, 0.9], [0.1, 0.05, 0.0]
    keep = [breadcrumb_keep(base, ft, k, g) for ft, k, g in zip(fts, dens, gammas)]
    mps = [{"weight": w, "density": k, "gamma": g} for w, k, g in zip(WEIGHTS, dens, gammas)]
    consensus = "sum" if name == "breadcrumbs_ties" else None
    close(run(name, base, fts, mps), reference(base, fts, WEIGHTS, keep=keep, consensus=consensus))
    assert sum(keep[2]) == 27  # gamma 0 keeps the density (mergekit's slice would keep none)


@pytest.mark.parametrize("name", ["della", "della_linear"])
@pytest.mark.parametrize("rescale_norm", ["l1", "keep_probability"])
def test_della(name, rescale_norm):
    base, fts = family(shape=(5, 8))
    dens, eps, seeds = [0.5, 0.4, 0.6], [0.2, 0.1, 0.3], [3, 4, 5]
    probs = [della_probs(base, ft, k, e) for ft, k, e in zip(fts, dens, eps)]
    keep = [[u < p for u, p in zip(seeded_uniform(s, NAME, base.shape).flatten().tolist(), pr)] for s, pr in zip(seeds, probs)]
    mps = [{"weight": w, "density": k, "epsilon": e, "seed": s} for w, k, e, s in zip(WEIGHTS, dens, eps, seeds)]
    consensus = "sum" if name == "della" else None
    expected = reference(
        base, fts, WEIGHTS, keep=keep, probs=probs, rescale=rescale_norm, consensus=consensus, normalize=(name == "della")
    )
    close(run(name, base, fts, mps, {"rescale_norm": rescale_norm}), expected)


def test_shared_generator_draws_in_model_order_and_defaults_are_reproducible():
    base, fts = family(shape=(8, 6))
    mps = [{"weight": 1.0, "density": 0.5} for _ in fts]
    out = run("dare_linear", base, fts, mps, {"rescale": False}, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    keep = [(torch.rand(base.shape, generator=g) < 0.5).flatten().tolist() for _ in fts]
    close(out, reference(base, fts, [1.0] * 3, keep=keep))
    again = run("dare_linear", base, fts, mps, {"rescale": False}, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out, again)
    other = run("dare_linear", base, fts, mps, {"rescale": False}, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(out, other)
    assert torch.equal(run("dare_linear", base, fts, mps), run("dare_linear", base, fts, mps))  # no seed, no generator


def test_dare_keep_fraction_and_unbiased_rescale():
    base, fts = family(n=1, shape=(100, 60))
    delta = (fts[0] - base).double()
    out = run("dare_linear", base, fts, [{"weight": 1.0, "density": 0.3, "seed": 1}], {"rescale": False})
    assert abs(float((out != base.double()).double().mean()) - 0.3) < 0.02
    draws = [run("dare_linear", base, fts, [{"weight": 1.0, "density": 0.5, "seed": s}], {"rescale_norm": "keep_probability"}) for s in range(60)]
    mean_delta = torch.stack(draws).mean(0) - base.double()
    # each entry: mean of 60 draws of 2 x Bernoulli(0.5) x d; the average over entries of the error is tiny
    assert float((mean_delta - delta).mean().abs()) < 3e-3
    assert float((mean_delta - delta).abs().mean()) < 0.15 * float(delta.abs().mean())
