"""Pairwise metrics against plain numpy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from engine.analysis.similarity import PairParams, cosine_matrix, pair_metrics, topk_mask
from engine.analysis.spectra import SpectrumParams, tensor_metrics
from tests.analysis.helpers import np64, ref_topk_set


def _pair(seed=0, shape=(30, 50), shared=0.5):
    gen = torch.Generator().manual_seed(seed)
    common = torch.randn(*shape, generator=gen)
    a = shared * common + torch.randn(*shape, generator=gen)
    b = shared * common + torch.randn(*shape, generator=gen)
    return a, b


@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 1.0])
def test_pair_metrics_match_numpy(density):
    a, b = _pair(seed=1)
    params = PairParams(density=density, subspace_rank=4)
    _, left_a = tensor_metrics(a, None, SpectrumParams(), want_left=4)
    _, left_b = tensor_metrics(b, None, SpectrumParams(), want_left=4)
    m = pair_metrics(a, b, params, left_a=left_a, left_b=left_b)

    x, y = np64(a).ravel(), np64(b).ravel()
    assert m["dot"] == pytest.approx(float(x @ y), rel=1e-12)
    assert m["cosine"] == pytest.approx(float(x @ y / np.linalg.norm(x) / np.linalg.norm(y)), rel=1e-12)
    ta, tb = ref_topk_set(x, density), ref_topk_set(y, density)
    union = ta | tb
    conflicts = sum(1 for i in union if x[i] * y[i] < 0)
    assert m["sign_conflict"] == pytest.approx(conflicts / len(union))
    assert m["topk_jaccard"] == pytest.approx(len(ta & tb) / len(union))
    # principal angles: scipy computes them another way (from orthonormal bases, by angles)
    ua = np.linalg.svd(np64(a), full_matrices=False)[0][:, :4]
    ub = np.linalg.svd(np64(b), full_matrices=False)[0][:, :4]
    expected = np.sort(np.cos(scipy.linalg.subspace_angles(ua, ub)))[::-1]
    np.testing.assert_allclose(m["principal_cosines"], expected, atol=1e-5)
    assert m["subspace_overlap"] == pytest.approx(float(np.mean(expected ** 2)), abs=1e-5)


def test_identical_and_opposite_vectors():
    a, _ = _pair(seed=2)
    _, left = tensor_metrics(a, None, SpectrumParams(), want_left=3)
    same = pair_metrics(a, a.clone(), PairParams(subspace_rank=3), left_a=left, left_b=left)
    assert same["cosine"] == pytest.approx(1.0) and same["sign_conflict"] == 0.0
    assert same["topk_jaccard"] == 1.0
    np.testing.assert_allclose(same["principal_cosines"], [1.0, 1.0, 1.0], atol=1e-6)
    flipped = pair_metrics(a, -a, PairParams())
    assert flipped["cosine"] == pytest.approx(-1.0) and flipped["sign_conflict"] == 1.0
    assert flipped["principal_cosines"] is None  # no vectors given


def test_zero_vector_gives_none_not_nan():
    a, _ = _pair(seed=3)
    m = pair_metrics(a, torch.zeros_like(a), PairParams())
    assert m["cosine"] is None and m["dot"] == 0.0
    assert m["topk_jaccard"] == 0.0  # the zero vector has an empty top-k set
    assert m["sign_conflict"] == 0.0
    both = pair_metrics(torch.zeros(4, 4), torch.zeros(4, 4), PairParams())
    assert both["sign_conflict"] is None and both["topk_jaccard"] is None


def test_topk_mask_ties_and_zeros():
    t = torch.tensor([0.0, 3.0, -3.0, 1.0, 0.0, 2.0])
    assert topk_mask(t, 0.2).tolist() == [False, True, True, False, False, False]  # k=2, tie kept
    assert topk_mask(t, 1.0).tolist() == [False, True, True, True, False, True]  # zeros never in


def test_cosine_matrix_from_sums():
    gen = torch.Generator().manual_seed(4)
    vecs = [torch.randn(100, generator=gen) for _ in range(3)]
    sq = [float(v.double() @ v.double()) for v in vecs]
    dots = {(i, j): float(vecs[i].double() @ vecs[j].double()) for i in range(3) for j in range(i + 1, 3)}
    mat = cosine_matrix(sq, dots)
    for i in range(3):
        for j in range(3):
            x, y = np64(vecs[i]), np64(vecs[j])
            assert mat[i][j] == pytest.approx(float(x @ y / math.sqrt((x @ x) * (y @ y))))
    assert cosine_matrix([0.0, 1.0], {(0, 1): 0.0}) == [[None, None], [None, 1.0]]
