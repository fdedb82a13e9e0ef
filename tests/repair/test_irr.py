"""IRR on synthetic layers: identify (signs, Fisher ranks), remove, recalibrate."""

from __future__ import annotations

import torch

from engine.repair.irr import Params, irr_matrix, removal_mask, repair_tensor
from engine.repair.obs import output_drift
from engine.repair.registry import TensorInputs


def layer(rows=10, cols=14, tokens=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(rows, cols, generator=g)
    vector = torch.randn(rows, cols, generator=g)
    fisher = torch.rand(rows, cols, generator=g)
    x = torch.randn(tokens, cols, generator=g) @ torch.randn(cols, cols, generator=g)
    return delta, vector, fisher, 2.0 * x.T @ x / 8


def test_keep_all_conflicting_removes_nothing_whatever_the_recalibration():
    d, v, f, h = layer()
    for recal in (True, False):
        out, report = irr_matrix(d, v, f, h, Params(keep_conflicting=1.0, recalibrate=recal))
        assert torch.equal(out, d) and report["removed_share"] == 0.0


def test_remove_more_at_zero_removes_the_whole_delta():
    d, v, f, h = layer()
    w_a = torch.randn_like(d)
    inputs = TensorInputs(name="m.weight", aligned=w_a, finetuned=w_a + d, target=True,
                          safety_vector=v, fisher=f, task_hessian=h)
    out, _ = repair_tensor(inputs, Params(remove_more=True, keep_conflicting=0.0))
    assert torch.equal(out, w_a)


def test_a_safety_vector_of_the_same_signs_changes_nothing():
    d, _, f, h = layer()
    out, report = irr_matrix(d, d * 3.0, f, h, Params())
    assert torch.equal(out, d) and report["conflict_share"] == 0.0


def test_removed_entries_are_exactly_zero_and_are_the_conflicting_ones():
    d, v, f, h = layer()
    out, report = irr_matrix(d, v, f, h, Params(blocksize=128, recalibrate=False))
    conflict = torch.sign(d) != torch.sign(v)
    assert torch.equal(out == 0, conflict)  # no recalibration: one block, the original signs
    assert torch.equal(out[~conflict], d[~conflict])
    out, report = irr_matrix(d, v, f, h, Params(blocksize=4))
    assert report["removed_share"] > 0
    assert int((out == 0).sum()) >= round(report["removed_share"] * d.numel())


def test_keep_conflicting_keeps_the_lowest_fisher_share():
    d, v, f, _ = layer()
    mask = removal_mask(d, v, f, Params(keep_conflicting=0.5))
    conflict = torch.sign(d) != torch.sign(v)
    kept = conflict & ~mask
    assert int(kept.sum()) == int(conflict.sum() * 0.5)
    assert float(f[kept].max()) <= float(f[mask].min())


def test_recalibration_lowers_the_task_drift_of_plain_removal():
    d, v, f, h = layer()
    for p in (0.0, 0.5):
        recal, report = irr_matrix(d, v, f, h, Params(keep_conflicting=p, blocksize=128))
        plain, _ = irr_matrix(d, v, f, h, Params(keep_conflicting=p, blocksize=128, recalibrate=False))
        assert output_drift(recal - d, h) < output_drift(plain - d, h)
        assert report["task_drift_after"] <= report["task_drift_plain_removal"]


def test_non_targets_keep_their_finetuned_values():
    a, f = torch.zeros(3), torch.ones(3)
    out, _ = repair_tensor(TensorInputs(name="model.norm.weight", aligned=a, finetuned=f), Params())
    assert torch.equal(out, f)
