"""engine.merge.sparsify and bit packing, against plain sorted/numpy references."""

import numpy as np
import pytest
import torch

from engine.merge.common import pack_bits, unpack_bits
from engine.merge.sparsify import apply_mask, della_keep_probabilities, magnitude_mask, outlier_mask, topk_mask
from tests.merge.helpers import rand


@pytest.mark.parametrize("k", [0, 1, 7, 29, 30, 31])
def test_topk_mask_selects_exactly_the_largest(k):
    scores = rand(30, seed=1).abs()
    mask = topk_mask(scores, k)
    assert int(mask.sum()) == min(k, 30)
    ranked = sorted(range(30), key=lambda j: -float(scores[j]))
    assert set(torch.nonzero(mask).flatten().tolist()) == set(ranked[: min(k, 30)])


def test_topk_mask_ties_keep_exactly_k_lowest_index_first():
    scores = torch.tensor([1.0, 3.0, 2.0, 2.0, 2.0, 0.5])
    assert topk_mask(scores, 3).tolist() == [False, True, True, True, False, False]
    assert topk_mask(scores, 2).tolist() == [False, True, True, False, False, False]
    assert topk_mask(torch.zeros(4), 2).tolist() == [True, True, False, False]


def test_magnitude_mask_count_and_minimum_one():
    d = rand(4, 5, seed=2)
    assert magnitude_mask(d, 1.0) is None
    assert int(magnitude_mask(d, 0.3).sum()) == 6  # int(0.3 * 20)
    assert int(magnitude_mask(d, 0.01).sum()) == 1  # never zero entries


@pytest.mark.parametrize("n, density, gamma", [(100, 0.9, 0.01), (100, 0.5, 0.1), (100, 0.95, 0.2), (40, 0.3, 0.0), (10, 0.5, 0.01)])
def test_outlier_mask_matches_sorted_reference(n, density, gamma):
    d = rand(n, seed=3)
    order = sorted(range(n), key=lambda j: abs(float(d[j])))  # ascending magnitude
    target, n_top = int(density * n), int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top, n_bot = n_top + n_bot, 0
    expected = set(order[n_bot : n - n_top])
    got = set(torch.nonzero(outlier_mask(d, density, gamma)).flatten().tolist())
    assert got == expected
    assert len(got) == target


def test_della_probabilities_reference():
    d = rand(3, 7, seed=4)
    probs = della_keep_probabilities(d, 0.5, 0.2)
    for r in range(3):
        row = [abs(float(x)) for x in d[r]]
        order = sorted(range(7), key=lambda j: row[j])
        for rank, j in enumerate(order):
            assert float(probs[r, j]) == pytest.approx(0.3 + 0.4 * rank / 6)
    one_d = della_keep_probabilities(rand(5, seed=5), 0.5, 0.1)
    assert float(one_d.min()) == pytest.approx(0.4) and float(one_d.max()) == pytest.approx(0.6)
    assert della_keep_probabilities(rand(4, 1, seed=6), 0.5, 0.1).eq(0.5).all()  # one column: density


def test_apply_mask_rescales():
    d = torch.tensor([1.0, -2.0, 3.0, -4.0])
    keep = torch.tensor([True, False, True, False])
    assert apply_mask(d, None, "l1").equal(d)
    assert apply_mask(d, keep, None).tolist() == [1.0, 0.0, 3.0, 0.0]
    assert apply_mask(d, keep, "l1").tolist() == pytest.approx([2.5, 0.0, 7.5, 0.0])  # L1 10 / 4
    assert apply_mask(d, keep, "keep_probability", 0.5).tolist() == [2.0, 0.0, 6.0, 0.0]
    assert apply_mask(torch.zeros(4), keep, "l1").eq(0).all()  # no 0/0


@pytest.mark.parametrize("shape", [(13,), (4, 4), (3, 5, 7), (1,), ()])
def test_pack_bits_matches_numpy_and_round_trips(shape):
    mask = rand(*shape, seed=7) > 0
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8
    assert packed.numpy().tolist() == np.packbits(mask.reshape(-1).numpy()).tolist()
    assert unpack_bits(packed, shape).equal(mask)


@pytest.mark.parametrize("shape", [(37, 53), (1, 1000), (5, 1), (64, 300)])
def test_magnitude_order_is_the_stable_argsort_of_magnitudes(shape):
    """The int64-key sort gives torch's stable argsort of |rows|: equal magnitudes (many here,
    and +0 / -0) in column order, inf and NaN last."""
    from engine.merge.sparsify import magnitude_order

    g = torch.Generator().manual_seed(0)
    rows = torch.randint(-4, 5, shape, generator=g).float() * 0.25
    if shape[1] > 3:
        rows[0, 0], rows[0, 1], rows[0, 2] = float("nan"), -0.0, float("-inf")
    assert torch.equal(magnitude_order(rows), torch.argsort(rows.abs(), dim=1, stable=True))
    assert torch.equal(magnitude_order(rows.double()), torch.argsort(rows.abs().double(), dim=1, stable=True))
