"""channel_merging (clustering, grouped storage, lookup) and sotu against plain references."""

import itertools

import pytest
import torch

from engine.errors import ParameterError
from engine.merge import get_method
from engine.merge.methods.channel_merging import Params, channel_merge_layer
from tests.merge.helpers import family, rand, seeded_uniform


def close(a, b, tol=2e-6):
    torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=tol)


def cosine(a, b):
    na, nb = float(a.norm()), float(b.norm())
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else 0.0


def average_linkage(vectors, groups):
    """Plain agglomerative clustering: merge the pair of clusters with the highest mean cross cosine."""
    clusters = [[i] for i in range(len(vectors))]
    while len(clusters) > groups:
        best = None
        for a, b in itertools.combinations(range(len(clusters)), 2):
            score = sum(cosine(vectors[i], vectors[j]) for i in clusters[a] for j in clusters[b]) / (len(clusters[a]) * len(clusters[b]))
            if best is None or score > best[0]:
                best = (score, a, b)
        _, a, b = best
        clusters[a] = sorted(clusters[a] + clusters[b])
        del clusters[b]
    return clusters


@pytest.mark.parametrize("n, groups", [(3, 2), (4, 2), (5, 3)])
def test_agglomerative_channel_merging_reference(n, groups):
    base, fts = family(n=n, shape=(6, 5))
    weights = [1.0 + 0.5 * i for i in range(n)]
    params = Params(num_groups=groups)
    grouped = channel_merge_layer(base, fts, weights, params)
    assert grouped.rows.shape == (groups, 6, 5) and grouped.index.shape == (n, 6) and grouped.index.dtype == torch.uint8
    for e in range(n):
        expected = torch.empty(6, 5, dtype=torch.float64)
        for c in range(6):
            clusters = average_linkage([(ft[c] - base[c]).double() for ft in fts], groups)
            members = next(cl for cl in clusters if e in cl)
            expected[c] = sum(weights[i] * fts[i][c].double() for i in members) / sum(weights[i] for i in members)
        close(grouped.rebuild(e), expected)
        mps = [{"weight": w} for w in weights]
        close(get_method("channel_merging").merge(base, fts, mps, {"num_groups": groups, "expert": e}), expected)


@pytest.mark.parametrize("clustering", ["agglomerative", "kmeans"])
def test_clear_clusters_are_found(clustering):
    base = torch.zeros(8, 16)
    a, b = rand(8, 16, seed=1), rand(8, 16, seed=2)
    fts = [a + rand(8, 16, seed=10 + i, scale=0.01) if i % 2 == 0 else b + rand(8, 16, seed=10 + i, scale=0.01) for i in range(4)]
    grouped = channel_merge_layer(base, fts, [1.0] * 4, Params(num_groups=2, clustering=clustering))
    assert grouped.index.tolist() == [[0] * 8, [1] * 8, [0] * 8, [1] * 8]  # groups numbered by first member
    close(grouped.rows[0], (fts[0] + fts[2]).double() / 2)
    close(grouped.rows[1], (fts[1] + fts[3]).double() / 2)


def test_enough_groups_is_lossless_and_the_mean_is_the_linear_merge():
    base, fts = family(n=3, shape=(4, 3))
    grouped = channel_merge_layer(base, fts, [1.0] * 3, Params(num_groups=5))
    for e in range(3):
        assert torch.equal(grouped.rebuild(e), fts[e])
    w = [1.0, 2.0, 3.0]
    mean = get_method("channel_merging").merge(base, fts, [{"weight": x} for x in w], {"num_groups": 2})
    close(mean, sum(x * ft.double() for x, ft in zip(w, fts)) / 6)


def test_task_arithmetic_groups_and_one_d_tensors():
    base, fts = family(n=3, shape=(4, 3))
    params = Params(num_groups=1, group_merge="task_arithmetic", lambda_=0.5)
    grouped = channel_merge_layer(base, fts, [1.0] * 3, params)
    close(grouped.rebuild(1), base.double() + 0.5 * sum(ft.double() - base.double() for ft in fts))
    vec_base, vecs = family(n=3, shape=(7,))
    g1 = channel_merge_layer(vec_base, vecs, [1.0] * 3, Params(num_groups=2))
    assert g1.rows.shape == (2, 1, 7) and g1.rebuild(0).shape == (7,)
    with pytest.raises(ParameterError, match="needs a base"):
        get_method("channel_merging").merge(None, fts, [{}] * 3, {"group_merge": "task_arithmetic"})
    with pytest.raises(ParameterError, match="expert 3 out of range"):
        get_method("channel_merging").merge(base, fts, [{}] * 3, {"expert": 3})


NAME = "model.layers.0.self_attn.v_proj.weight"


def test_sotu_reference_with_seeds():
    base, fts = family(n=3, shape=(10, 8))
    dens, seeds, weights = [0.1, 0.3, 0.2], [7, 8, 9], [1.0, 0.5, 2.0]
    mps = [{"weight": w, "density": k, "seed": s} for w, k, s in zip(weights, dens, seeds)]
    out = get_method("sotu").merge(base, fts, mps, {}, name=NAME)
    expected = base.double().clone()
    for ft, w, k, s in zip(fts, weights, dens, seeds):
        keep = seeded_uniform(s, NAME, base.shape) < k
        expected += w * (ft.double() - base.double()) * keep
    close(out, expected)
    rescaled = get_method("sotu").merge(base, fts, mps, {"rescale": True}, name=NAME)
    expected_r = base.double().clone()
    for ft, w, k, s in zip(fts, weights, dens, seeds):
        expected_r += w * (ft.double() - base.double()) * (seeded_uniform(s, NAME, base.shape) < k) / k
    close(rescaled, expected_r)


def test_sotu_disjoint_masks_do_not_overlap():
    base = torch.zeros(200, 50)
    fts = [torch.full((200, 50), float(1 << i)) for i in range(3)]  # bit i marks task i
    dens = [0.2, 0.3, 0.1]
    out = get_method("sotu").merge(base, fts, [{"density": k} for k in dens], {"disjoint": True, "seed": 4}, name=NAME)
    values = out.to(torch.int64)
    assert set(values.unique().tolist()) <= {0, 1, 2, 4}  # never two tasks in one entry
    for i, k in enumerate(dens):
        assert abs(float((values == (1 << i)).double().mean()) - k) < 0.02
    full = get_method("sotu").merge(base, fts, [{"density": k} for k in (0.5, 0.25, 0.25)], {"disjoint": True}, name=NAME)
    assert set(full.to(torch.int64).unique().tolist()) == {1, 2, 4}  # densities summing to 1 cover everything
    with pytest.raises(ParameterError, match="at most 1"):
        get_method("sotu").merge(base, fts, [{"density": 0.5}] * 3, {"disjoint": True})
