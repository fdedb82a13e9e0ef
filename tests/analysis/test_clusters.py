"""Channel clusters across experts: planted groups, counts, cosines against numpy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from engine.analysis.clusters import ClusterParams, channel_clusters
from engine.errors import IncompatibleModelsError
from tests.analysis.helpers import np64


def _planted(channels=12, width=20, seed=0):
    """Experts 0,1 share a direction per channel, experts 2,3 another (plus small noise)."""
    gen = torch.Generator().manual_seed(seed)
    d1, d2 = torch.randn(channels, width, generator=gen), torch.randn(channels, width, generator=gen)
    noise = lambda: 0.05 * torch.randn(channels, width, generator=gen)  # noqa: E731
    return [d1 + noise(), 2.0 * d1 + noise(), d2 + noise(), 0.5 * d2 + noise()]


@pytest.mark.parametrize("clustering", ["agglomerative", "kmeans"])
def test_planted_groups_are_found(clustering):
    experts = _planted()
    result = channel_clusters(experts, ClusterParams(num_groups=2, clustering=clustering))
    labels = result.labels
    assert labels.shape == (4, 12)
    assert torch.equal(labels[0], torch.zeros(12, dtype=torch.long))  # numbered by first member
    assert torch.equal(labels[1], labels[0]) and torch.equal(labels[2], labels[3])
    assert bool((labels[2] == 1).all())
    s = result.summary(include_labels=True)
    assert s["group_sizes"] == [24, 24]
    assert s["size_patterns"] == {"2+2": 12}
    assert s["expert_group_counts"] == [[12, 0], [12, 0], [0, 12], [0, 12]]
    assert s["co_assignment"][0][1] == 1.0 and s["co_assignment"][0][2] == 0.0
    assert s["stored_rows"] == 24 and s["storage_fraction"] == 0.5
    assert s["labels"] == labels.tolist()


def test_cosines_match_numpy():
    experts = _planted(seed=3)
    base = torch.randn(12, 20, generator=torch.Generator().manual_seed(9))
    weights = [base + e for e in experts]  # the clusters are of task vectors when a base is given
    result = channel_clusters(weights, ClusterParams(num_groups=2), base=base)
    s = result.summary()
    x = np.stack([np64(e) for e in experts])  # (N, C, D)
    unit = x / np.linalg.norm(x, axis=2, keepdims=True)
    cos = np.einsum("icd,jcd->ijc", unit, unit)
    labels = result.labels.numpy()
    within, between = [], []
    for i, j in itertools.combinations(range(4), 2):
        for c in range(12):
            (within if labels[i, c] == labels[j, c] else between).append(cos[i, j, c])
    assert s["within_group_cosine"] == pytest.approx(np.mean(within), abs=1e-6)
    assert s["between_group_cosine"] == pytest.approx(np.mean(between), abs=1e-6)
    np.testing.assert_allclose(s["mean_cosine"], cos.mean(axis=2), atol=1e-6)


def test_one_group_and_one_per_expert():
    experts = _planted()
    one = channel_clusters(experts, ClusterParams(num_groups=1)).summary()
    assert one["group_sizes"] == [48] and one["storage_fraction"] == 0.25
    assert one["between_group_cosine"] is None
    each = channel_clusters(experts, ClusterParams(num_groups=8)).summary()  # capped at N
    assert each["num_groups"] == 4 and each["storage_fraction"] == 1.0
    assert each["within_group_cosine"] is None


def test_mismatched_shapes_are_refused():
    with pytest.raises(IncompatibleModelsError) as info:
        channel_clusters([torch.zeros(3, 4), torch.zeros(4, 3)], name="layer.w")
    assert info.value.tensor == "layer.w"


def test_analyze_clusters_over_model_folders_with_cache(tmp_path):
    from cache import MetricStore
    from engine.analysis import analyze_clusters
    from tests.analysis.helpers import make_family

    base_dir, ft_dirs, base, fts = make_family(tmp_path / "models", n_finetunes=3)
    params = ClusterParams(num_groups=2)
    with MetricStore(tmp_path / "c.duckdb") as store:
        first = analyze_clusters(base_dir, ft_dirs, params, cache=store)
        second = analyze_clusters(base_dir, ft_dirs, params, cache=store)
    matrices = sorted(n for n, t in base.items() if t.dim() == 2)
    assert [layer["name"] for layer in first["layers"]] == matrices
    assert first["cache"]["misses"] == len(matrices) and second["cache"]["hits"] == len(matrices)
    assert second["layers"] == first["layers"]
    name = "model.layers.0.mlp.up_proj.weight"
    direct = channel_clusters([ft[name] - base[name] for ft in fts], params).summary()
    got = next(layer for layer in first["layers"] if layer["name"] == name)
    assert got["expert_group_counts"] == direct["expert_group_counts"]
    assert got["within_group_cosine"] == pytest.approx(direct["within_group_cosine"], abs=1e-6)
