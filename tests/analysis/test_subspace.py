"""The unit-order-free measures against SciPy, their invariance to a random permutation of
hidden units, and the old crop failing it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.linalg import subspace_angles

from engine.analysis.subspace import (cropped_cosine, principal_basis, principal_cosines,
                                      spectrum_similarity, subspace_overlap, token_side)


def test_principal_angles_match_scipy():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 6, generator=gen, dtype=torch.float64), torch.randn(40, 4, generator=gen, dtype=torch.float64)
    b[:, 0] = a[:, 0] + 0.1 * b[:, 0]  # one nearly shared direction
    u, v = principal_basis(a, 6), principal_basis(b, 4)
    ref = np.sort(np.cos(subspace_angles(a.numpy(), b.numpy())))[::-1]
    np.testing.assert_allclose(principal_cosines(u, v).numpy(), ref, atol=1e-10)
    assert subspace_overlap(u, v) == pytest.approx(float(np.mean(ref ** 2)), abs=1e-10)
    assert subspace_overlap(u, u) == pytest.approx(1.0)


def test_spectrum_matches_scipy_svd():
    from scipy.linalg import svdvals

    gen = torch.Generator().manual_seed(1)
    wa, wb = torch.randn(8, 5, generator=gen), torch.randn(12, 9, generator=gen)
    sa, sb = svdvals(wa.double().numpy()), svdvals(wb.double().numpy())
    sa = np.pad(sa, (0, sb.size - sa.size))
    assert spectrum_similarity(wa, wb) == pytest.approx(float(sa @ sb / np.linalg.norm(sa) / np.linalg.norm(sb)), rel=1e-10)
    assert spectrum_similarity(wa, torch.zeros(3, 3)) is None


def test_new_measures_ignore_a_permutation_of_hidden_units_and_the_crop_does_not():
    gen = torch.Generator().manual_seed(2)
    d_small, d_large, n_tok = 8, 12, 30
    emb_s, emb_l = torch.randn(n_tok, d_small, generator=gen), torch.randn(n_tok, d_large, generator=gen)
    w_s = torch.randn(16, d_small, generator=gen)     # readers: columns run over hidden units
    w_l = torch.randn(20, d_large, generator=gen)
    perm = torch.randperm(d_large, generator=gen)
    out_perm = torch.randperm(20, generator=gen)
    w_lp, emb_lp = w_l[out_perm][:, perm], emb_l[:, perm]   # the same model, units relabelled
    before = subspace_overlap(principal_basis(token_side(w_s, emb_s, 1), 4),
                              principal_basis(token_side(w_l, emb_l, 1), 4))
    after = subspace_overlap(principal_basis(token_side(w_s, emb_s, 1), 4),
                             principal_basis(token_side(w_lp, emb_lp, 1), 4))
    assert after == pytest.approx(before, abs=1e-10)
    assert spectrum_similarity(w_s, w_lp) == pytest.approx(spectrum_similarity(w_s, w_l), abs=1e-12)
    # a model against its own permuted copy: 1 for the new measures, not for the crop
    assert subspace_overlap(principal_basis(token_side(w_l, emb_l, 1), 4),
                            principal_basis(token_side(w_lp, emb_lp, 1), 4)) == pytest.approx(1.0)
    assert spectrum_similarity(w_l, w_lp) == pytest.approx(1.0)
    assert cropped_cosine(w_l, w_lp) < 0.5
    assert abs(cropped_cosine(w_s, w_l) - cropped_cosine(w_s, w_lp)) > 1e-3


def test_the_subspace_map_scores_a_permuted_copy_1(tmp_path):
    from engine.analysis.subspace import SUBSPACE_MEASURE, subspace_map
    from engine.evaluate.tokenizer import tokenizer_files
    from engine.zoo.build import new_model, new_model_like, write_model
    from engine.zoo.plan import Arch
    from tests.analysis.test_incompatibility import _permuted_copy

    tok = tokenizer_files(tmp_path / "tok")
    model = new_model(Arch(24, 2, 2, 48), seed=5).eval()
    twin = new_model_like(model)
    twin.load_state_dict(_permuted_copy(model, seed=9))
    write_model(tmp_path / "m", model, tok, {})
    write_model(tmp_path / "twin", twin, tok, {})
    write_model(tmp_path / "big", new_model(Arch(32, 3, 2, 64), seed=6), tok, {})
    same = subspace_map(tmp_path / "m", tmp_path / "twin", rank=4)
    assert same["measure"] == SUBSPACE_MEASURE and len(same["modules"]) == 7
    for suffix in same["modules"]:
        np.testing.assert_allclose(np.diag(np.array(same["modules"][suffix], dtype=float)), 1.0, atol=1e-8)
        np.testing.assert_allclose(np.diag(np.array(same["spectrum"][suffix], dtype=float)), 1.0, atol=1e-8)
    other = subspace_map(tmp_path / "m", tmp_path / "big", rank=4)
    assert other["layers_b"] == [0, 1, 2]
    cells = np.array([v for m in other["modules"].values() for row in m for v in row])
    assert 0 <= cells.min() and cells.max() < 0.999
