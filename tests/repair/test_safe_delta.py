"""Safe Delta on synthetic layers: the mask, the budget rules, the compensation, and one paper-mode
run re-derived in float64 numpy from the spec (an independent loop, not the code under test)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.repair.obs import output_drift
from engine.repair.safe_delta import Params, repair_tensor, safe_delta_matrix
from engine.repair.registry import TensorInputs


def layer(rows=12, cols=10, tokens=200, seed=0, delta_scale=0.3):
    g = torch.Generator().manual_seed(seed)
    w_a = torch.randn(rows, cols, generator=g)
    w_f = w_a + delta_scale * torch.randn(rows, cols, generator=g)
    x = torch.randn(tokens, cols, generator=g) @ torch.randn(cols, cols, generator=g)
    hessian = 2.0 * x.T @ x / 4  # (2/N) sum x x^T, N = 4 samples
    return w_a, w_f, hessian


def test_compensation_lowers_safety_drift_for_the_same_mask():
    w_a, w_f, h = layer()
    for s in (0.05, 0.2, 0.5):
        on, rep_on = safe_delta_matrix(w_a, w_f, h, Params(budget="fraction", s=s))
        off, rep_off = safe_delta_matrix(w_a, w_f, h, Params(budget="fraction", s=s, compensate=False))
        assert rep_on["kept_share"] == rep_off["kept_share"]  # one block: the same mask
        assert output_drift(on - w_a, h) <= output_drift(off - w_a, h) + 1e-9
        assert output_drift(on - w_a, h) < output_drift(off - w_a, h)  # strictly, here


def test_s_zero_is_the_aligned_model_and_s_one_without_exclusion_the_finetune():
    w_a, w_f, h = layer()
    out, report = safe_delta_matrix(w_a, w_f, h, Params(budget="fraction", s=0.0))
    assert torch.equal(out, w_a) and report["kept_share"] == 0.0
    out, report = safe_delta_matrix(w_a, w_f, h, Params(budget="fraction", s=1.0, exclude_top=0.0))
    assert torch.equal(out, w_f) and report["kept_share"] == 1.0


@pytest.mark.parametrize("blocksize", [3, 2048])
def test_kept_entries_equal_the_finetune_bit_for_bit(blocksize):
    w_a, w_f, h = layer(rows=9, cols=13)
    out, report = safe_delta_matrix(w_a, w_f, h, Params(budget="fraction", s=0.3, blocksize=blocksize))
    kept = out == w_f
    assert 0.0 < report["kept_share"] <= kept.float().mean().item()
    # at s = 1 every candidate is kept and the excluded share never is
    out, report = safe_delta_matrix(w_a, w_f, h, Params(budget="fraction", s=1.0, blocksize=blocksize))
    assert report["excluded_share"] > 0.1
    assert report["kept_share"] + report["excluded_share"] == pytest.approx(1.0)
    assert (out == w_f).float().mean().item() >= report["kept_share"]


def numpy_safe_delta_paper(w_a, w_f, h, s, percdamp=0.01, exclude=0.15, sub=4):
    """The spec's paper-mode rule, one block, float64, written from the spec's text."""
    w = w_a.astype(np.float64).copy()
    f = w_f.astype(np.float64)
    h = h.astype(np.float64).copy()
    rows, cols = w.shape
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h[np.arange(cols), np.arange(cols)] += percdamp * np.mean(np.diag(h))
    hinv = np.linalg.inv(h)
    u = np.linalg.cholesky(hinv).T  # upper factor: u.T @ u = hinv
    d = np.diag(u)
    key = np.broadcast_to(1.0 / d ** 2, (rows, cols))
    cost = (f - w) ** 2 / d ** 2
    order = np.argsort(key.reshape(-1), kind="stable")
    order = order[:key.size - int(exclude * key.size)]
    eps = key.mean() * (s / 2.0) * (rows / 4096.0)
    flat = np.zeros(key.size, bool)
    flat[order[np.cumsum(cost.reshape(-1)[order]) <= eps]] = True
    mask = flat.reshape(rows, cols)
    q_all = np.zeros_like(w)
    for j1 in range(0, cols, sub):
        j2 = min(j1 + sub, cols)
        cur = w[:, j1:j2].copy()
        q = np.where(mask[:, j1:j2], f[:, j1:j2], cur)
        q_all[:, j1:j2] = q
        err = (cur - q) / d[j1:j2]
        w[:, j2:] -= err @ u[j1:j2, j2:]
    return q_all, mask


def test_paper_mode_matches_a_float64_numpy_derivation():
    # small deltas, as LLM fine-tunes have: the paper's budget then admits a real share
    w_a, w_f, h = layer(rows=16, cols=12, delta_scale=2e-3, seed=3)
    h = h.double().float()
    s = 0.05
    ref, mask = numpy_safe_delta_paper(w_a.double().numpy(), w_f.double().numpy(), h.double().numpy(), s)
    assert 0.1 < mask.mean() < 0.8
    out, report = safe_delta_matrix(w_a.double(), w_f.double(), h, Params(budget="paper", s=s))
    assert report["kept_share"] == pytest.approx(mask.mean())
    np.testing.assert_allclose(out.double().numpy(), ref, atol=1e-6, rtol=0)


def test_non_linear_tensors_follow_the_policy():
    a, f = torch.zeros(3), torch.ones(3)
    inputs = TensorInputs(name="model.norm.weight", aligned=a, finetuned=f, target=False)
    assert torch.equal(repair_tensor(inputs, Params())[0], a)
    assert torch.equal(repair_tensor(inputs, Params(non_linear_policy="finetuned"))[0], f)


def test_dead_column_keeps_its_weights_and_the_rest_is_finite():
    w_a, w_f, h = layer()
    h[:, 4] = 0.0
    h[4, :] = 0.0
    out, report = safe_delta_matrix(w_a, w_f, h, Params(budget="fraction", s=0.2))
    assert report["dead_columns"] == 1
    assert torch.isfinite(out).all()
