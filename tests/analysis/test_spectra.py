"""Per-tensor metrics against plain numpy float64 references; randomized SVD accuracy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.analysis.spectra import (SpectrumParams, compute_spectrum, modelled_tail, randomized_svd,
                                     tensor_metrics)
from tests.analysis.helpers import (np64, ref_effective_rank, ref_energy_k, ref_kurtosis,
                                    ref_singular_values)

METHODS = ["exact", "gram"]


def _lowrank_plus_noise(m, n, rank, noise, seed=0):
    gen = torch.Generator().manual_seed(seed)
    low = torch.randn(m, rank, generator=gen) @ torch.randn(rank, n, generator=gen)
    return low + noise * torch.randn(m, n, generator=gen)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(40, 70), (90, 30), (64, 64)])
def test_scalar_and_spectral_metrics_match_numpy(method, shape):
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(*shape, generator=gen)
    delta = _lowrank_plus_noise(*shape, rank=4, noise=0.3, seed=3)
    delta[0, :5] = 0.0  # a few exact zeros for sparsity
    params = SpectrumParams(top_k=10, method=method, sparsity_eps=0.01)
    m, _ = tensor_metrics(delta, base, params)

    d, w = np64(delta), np64(base)
    s = ref_singular_values(d)
    fro = math.sqrt(float(np.sum(d * d)))
    assert m["spectrum"] == method
    assert m["fro_norm"] == pytest.approx(fro, rel=1e-12)
    assert m["rel_norm"] == pytest.approx(fro / math.sqrt(float(np.sum(w * w))), rel=1e-12)
    assert m["sparsity"] == pytest.approx(float(np.mean(np.abs(d) < 0.01 * np.abs(d).max())))
    assert m["kurtosis"] == pytest.approx(ref_kurtosis(d), rel=1e-9)
    np.testing.assert_allclose(m["top_singular_values"], s[:10], rtol=1e-9)
    assert m["effective_rank"] == pytest.approx(ref_effective_rank(s), rel=1e-9)
    assert m["stable_rank"] == pytest.approx(fro ** 2 / s[0] ** 2, rel=1e-9)
    for level in (50, 90, 99):
        assert m[f"energy_k_{level}"] == ref_energy_k(s, level / 100)
    assert m["nan_count"] == 0 and m["inf_count"] == 0
    assert m["shape"] == list(shape)


def test_auto_picks_exact_gram_randomized_by_size():
    params = SpectrumParams(exact_max_elements=100, gram_max_dim=20, top_k=2, oversample=2)
    assert compute_spectrum(torch.randn(10, 10), params).method == "exact"
    assert compute_spectrum(torch.randn(20, 50), params).method == "gram"
    assert compute_spectrum(torch.randn(30, 50), params).method == "randomized"


def test_nonfinite_entries_are_counted_and_zeroed():
    delta = torch.randn(20, 30, generator=torch.Generator().manual_seed(1))
    clean = delta.clone()
    delta[1, 2] = float("nan")
    delta[3, 4] = float("inf")
    delta[5, 6] = float("-inf")
    m, _ = tensor_metrics(delta, None, SpectrumParams(top_k=5))
    assert (m["nan_count"], m["inf_count"]) == (1, 2)
    clean[1, 2] = clean[3, 4] = clean[5, 6] = 0.0
    ref, _ = tensor_metrics(clean, None, SpectrumParams(top_k=5))
    for key in ("fro_norm", "effective_rank", "stable_rank", "kurtosis", "top_singular_values"):
        assert m[key] == ref[key]
    assert all(math.isfinite(v) for v in m["top_singular_values"])


@pytest.mark.parametrize("method", ["exact", "gram", "randomized"])
def test_zero_delta_is_rank_zero(method):
    m, left = tensor_metrics(torch.zeros(30, 40), torch.ones(30, 40), SpectrumParams(top_k=4, method=method),
                             want_left=3)
    assert m["fro_norm"] == 0.0 and m["rel_norm"] == 0.0
    assert m["top_singular_values"] == [0.0] * 4
    assert m["effective_rank"] == 0.0 and m["stable_rank"] == 0.0
    assert (m["energy_k_50"], m["energy_k_90"], m["energy_k_99"]) == (0, 0, 0)
    assert m["sparsity"] == 1.0 and m["kurtosis"] is None and left is None


@pytest.mark.parametrize("method", METHODS)
def test_rank_one_delta(method):
    u = torch.randn(25, 1, generator=torch.Generator().manual_seed(2))
    v = torch.randn(1, 35, generator=torch.Generator().manual_seed(3))
    m, _ = tensor_metrics(u @ v, None, SpectrumParams(top_k=3, method=method))
    assert m["effective_rank"] == pytest.approx(1.0, abs=1e-4)  # fp32 rounding leaves ~1e-7 s_1 values
    assert m["stable_rank"] == pytest.approx(1.0, rel=1e-9)
    assert m["energy_k_99"] == 1
    assert m["top_singular_values"][0] == pytest.approx(float(u.norm() * v.norm()), rel=1e-6)
    assert m["top_singular_values"][1] == pytest.approx(0.0, abs=1e-5 * m["top_singular_values"][0])


def test_vectors_have_no_spectrum_and_nd_is_flattened():
    vec, _ = tensor_metrics(torch.arange(10.0), torch.ones(10), SpectrumParams())
    assert vec["top_singular_values"] is None and vec["effective_rank"] is None
    assert vec["fro_norm"] == pytest.approx(math.sqrt(sum(i * i for i in range(10))))
    conv = torch.randn(6, 3, 2, 2, generator=torch.Generator().manual_seed(4))
    m, _ = tensor_metrics(conv, None, SpectrumParams(top_k=3))
    np.testing.assert_allclose(m["top_singular_values"], ref_singular_values(np64(conv).reshape(6, -1))[:3], rtol=1e-9)


def _known_spectrum(m, n, values, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(values), generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(values), generator=gen, dtype=torch.float64))
    return (u * torch.tensor(values, dtype=torch.float64)) @ v.T


def test_randomized_svd_recovers_a_known_spectrum():
    values = [10.0 / (1 + j) ** 1.5 for j in range(120)]
    a = _known_spectrum(300, 200, values).float()
    got, left, iters, converged = randomized_svd(a, 24, top=8, want_left=4)
    assert converged and iters >= 1
    np.testing.assert_allclose(got[:8].numpy(), values[:8], rtol=1e-4)
    # the left vectors span the true top singular directions
    u_true = torch.linalg.svd(a.double(), full_matrices=False)[0][:, :4]
    cos = torch.linalg.svdvals(u_true.T @ left.double())
    assert float(cos.min()) > 0.999


def test_randomized_matches_numpy_on_lowrank_plus_noise():
    a = _lowrank_plus_noise(300, 600, rank=12, noise=0.05, seed=11)
    params = SpectrumParams(top_k=12, method="randomized", oversample=12)
    m, _ = tensor_metrics(a, None, params)
    s = ref_singular_values(np64(a))
    assert m["spectrum"] == "randomized" and m["svd_converged"]
    np.testing.assert_allclose(m["top_singular_values"], s[:12], rtol=1e-4)
    assert m["stable_rank"] == pytest.approx(float(np.sum(s ** 2) / s[0] ** 2), rel=1e-4)
    # values 13..24 are not iterated to convergence: the tail is right as a share of the total
    assert m["tail_energy_fraction"] == pytest.approx(float(np.sum(s[24:] ** 2) / np.sum(s ** 2)), abs=1e-5)
    # energy levels inside the computed values are exact
    assert m["energy_k_50"] == ref_energy_k(s, 0.5)
    assert m["energy_k_90"] == ref_energy_k(s, 0.9)


def test_randomized_tail_model_is_exact_for_a_flat_tail():
    values = [50.0, 40.0, 30.0] + [1.0] * 97  # three directions over a flat floor
    a = _known_spectrum(150, 100, values, seed=5).float()
    m, _ = tensor_metrics(a, None, SpectrumParams(top_k=3, oversample=3, method="randomized"))
    s = np.array(values)
    assert m["effective_rank"] == pytest.approx(ref_effective_rank(s), rel=1e-3)
    for level in (50, 90, 99):
        assert m[f"energy_k_{level}"] == ref_energy_k(s, level / 100)


def test_modelled_tail_keeps_the_tail_energy():
    a = _lowrank_plus_noise(120, 200, rank=3, noise=0.5, seed=9)
    spec = compute_spectrum(a, SpectrumParams(top_k=4, oversample=4, method="randomized"))
    tail = modelled_tail(spec)
    assert tail.numel() == 120 - 8
    assert float((tail ** 2).sum()) == pytest.approx(spec.tail_energy, rel=1e-9)
    assert float(tail.max()) <= float(spec.values[-1]) * (1 + 1e-9)


def test_gram_left_vectors_match_svd_for_tall_and_wide():
    for shape in [(60, 25), (25, 60)]:
        a = _lowrank_plus_noise(*shape, rank=5, noise=0.01, seed=1)
        spec = compute_spectrum(a, SpectrumParams(top_k=5, method="gram"), want_left=3)
        u = np.linalg.svd(np64(a), full_matrices=False)[0][:, :3]
        cos = np.linalg.svd(u.T @ np64(spec.left), compute_uv=False)
        assert cos.min() > 0.9999


@pytest.mark.parametrize("shape_name", ["power", "bulk", "lowrank_bulk", "exponential"])
def test_modelled_tail_estimates_are_close_on_typical_spectra(shape_name):
    gen = torch.Generator().manual_seed(21)
    if shape_name == "bulk":
        a = torch.randn(300, 300, generator=gen)
    elif shape_name == "lowrank_bulk":
        a = _lowrank_plus_noise(300, 600, rank=8, noise=0.1, seed=22)
    else:
        values = ([1.0 / (j + 1) for j in range(300)] if shape_name == "power"
                  else [math.exp(-j / 45) for j in range(300)])
        a = _known_spectrum(300, 450, values, seed=23).float()
    m, _ = tensor_metrics(a, None, SpectrumParams(method="randomized"))
    s = ref_singular_values(np64(a))
    assert m["spectrum"] == "randomized"
    assert m["effective_rank"] == pytest.approx(ref_effective_rank(s), rel=0.15)
    for level in (50, 90, 99):
        assert m[f"energy_k_{level}"] == pytest.approx(ref_energy_k(s, level / 100), rel=0.15, abs=1)
