"""Several exact order statistics in one bracketing pass equal the sorted tensor's values."""

from __future__ import annotations

import pytest
import torch

from engine.merge import order_stats
from engine.merge.order_stats import order_statistics


@pytest.fixture(autouse=True)
def small_sizes(monkeypatch):
    monkeypatch.setattr(order_stats, "SAMPLE", 256)  # the bracketing path on small tensors
    monkeypatch.setattr(order_stats, "CHUNK", 1000)
    monkeypatch.setattr(order_stats, "SMALL", 100)


def _sorted_reference(flat: torch.Tensor, ranks: list[int]) -> list[float]:
    ordered = flat.double().sort().values
    return [float(ordered[r]) for r in ranks]


@pytest.mark.parametrize("kind", ["normal", "heavy_ties", "skewed"])
def test_quartiles_equal_the_sorted_values(kind):
    g = torch.Generator().manual_seed(3)
    n = 12_345
    if kind == "normal":
        flat = torch.randn(n, generator=g)
    elif kind == "heavy_ties":  # a few distinct values: every bracket holds one value's repeats
        flat = torch.randint(0, 5, (n,), generator=g).float()
    else:
        flat = torch.randn(n, generator=g).exp_().pow_(3)
    last = n - 1
    ranks = [0, last // 4, last // 2, (3 * last) // 4, last]
    got = [float(v) for v in order_statistics(flat, ranks)]
    assert got == _sorted_reference(flat, ranks)


@pytest.mark.parametrize("wrong", [(10.0, 11.0), (-11.0, -10.0), (0.0, 0.0)])
def test_a_missed_bracket_falls_back_to_exact_selection(monkeypatch, wrong):
    monkeypatch.setattr(order_stats, "bracket", lambda sample, q: wrong)
    g = torch.Generator().manual_seed(5)
    flat = torch.randn(5000, generator=g)
    ranks = [1, 1249, 2499, 3748, 4998]
    assert [float(v) for v in order_statistics(flat, ranks)] == _sorted_reference(flat, ranks)


def test_small_tensors_take_kthvalue_directly():
    flat = torch.tensor([3.0, -1.0, 2.0, 2.0, 7.0])
    assert [float(v) for v in order_statistics(flat, [0, 2, 4])] == [-1.0, 2.0, 7.0]


def _band_by_torch(x: torch.Tensor, lo: float, hi: float) -> tuple[int, torch.Tensor]:
    """The band by plain torch comparisons (an independent reference for ``band_of``)."""
    below = int((x < lo).sum())
    return below, x[(x >= lo) & (x <= hi)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bounds", [(-0.5, 0.7), (-float("inf"), 0.1), (0.2, float("inf")), (0.3, 0.3)])
def test_band_of_equals_plain_comparisons(dtype, bounds):
    # float32 / float64 take numpy's path, bf16 the torch one; NaN, inf and -0.0 included
    g = torch.Generator().manual_seed(11)
    x = torch.randint(-8, 9, (3000,), generator=g).float().div_(10).to(dtype)
    x[::97] = float("nan")
    x[5], x[6], x[7] = float("inf"), -float("inf"), -0.0
    lo, hi = (float(torch.tensor(v, dtype=dtype)) for v in bounds)  # bounds are entries' values
    scratch = torch.empty((2, 4096), dtype=torch.float32)
    below, band = order_stats.band_of(x, lo, hi, scratch)
    ref_below, ref_band = _band_by_torch(x, lo, hi)
    assert below == ref_below
    assert band.dtype == x.dtype and torch.equal(band, ref_band)
    assert band.data_ptr() != x.data_ptr()  # a copy: the caller reuses x's buffer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_kth_smallest_equals_kthvalue_with_heavy_ties(dtype):
    g = torch.Generator().manual_seed(12)
    band = torch.randint(0, 7, (5001,), generator=g).to(dtype).div_(3)
    for k in (1, 2, 714, 2500, 5000, 5001):
        got = order_stats.kth_smallest(band, k)
        assert got.dtype == band.dtype and got.shape == ()
        assert float(got) == float(torch.kthvalue(band, k).values)
