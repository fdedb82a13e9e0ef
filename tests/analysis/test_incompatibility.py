"""Cross-scale maps: linear CKA against numpy, projection, and both maps on tiny Llama models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.analysis.incompatibility import (IncompatibilityParams, cka_matrix, incompatibility_maps,
                                             linear_cka, project_matrix)
from engine.errors import ParameterError
from tests.analysis.helpers import np64


def ref_cka(x: np.ndarray, y: np.ndarray) -> float:
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    return float(np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def test_linear_cka_matches_numpy_and_its_invariances():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=gen)
    y = x @ torch.randn(12, 20, generator=gen) + 0.5 * torch.randn(200, 20, generator=gen)
    assert linear_cka(x, y) == pytest.approx(ref_cka(np64(x), np64(y)), rel=1e-10)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=torch.float64))
    # invariant to rotations, isotropic scaling and shifts of either side
    assert linear_cka(3.0 * x.double() @ q + 7.0, y) == pytest.approx(linear_cka(x, y), rel=1e-9)
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, torch.ones(200, 3)) is None
    with pytest.raises(ParameterError):
        linear_cka(x, y[:10])
    mat = cka_matrix([x, y], [y, x, x[:, :3]])
    assert len(mat) == 2 and len(mat[0]) == 3
    assert mat[0][1] == pytest.approx(1.0) and mat[1][0] == pytest.approx(1.0)
    assert mat[0][0] == pytest.approx(ref_cka(np64(x), np64(y)), rel=1e-9)


def test_projection_keeps_small_matrices_and_uses_top_singular_vectors():
    w = torch.randn(6, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.equal(project_matrix(w, 6, 9), w)
    p = project_matrix(w, 4, 5)
    u, s, vh = np.linalg.svd(np64(w), full_matrices=False)
    np.testing.assert_allclose(p.numpy(), (u[:4, :4] * s[:4]) @ vh[:4, :5], atol=1e-12)
    with pytest.raises(ParameterError):
        project_matrix(w, 7, 9)


@pytest.fixture(scope="module")
def two_families(tmp_path_factory):
    from engine.zoo.build import new_model, write_model
    from engine.zoo.plan import Arch
    from engine.evaluate.tokenizer import tokenizer_files

    root = tmp_path_factory.mktemp("families")
    tok = tokenizer_files(root / "tok")
    small = root / "small"
    large = root / "large"
    write_model(small, new_model(Arch(16, 2, 2, 32), seed=1), tok, {})
    write_model(large, new_model(Arch(24, 3, 2, 48), seed=2), tok, {})
    return small, large


def test_maps_between_two_widths_and_depths(two_families):
    small, large = two_families
    params = IncompatibilityParams(n_per_task=2, tasks=["reverse", "upper"])
    maps = incompatibility_maps(small, large, params)
    act, par = maps["activation"], maps["parameters"]
    assert act["rows"] == "tokens" and act["probes"] == 4
    assert (act["width_a"], act["width_b"]) == (16, 24)
    assert len(act["cka"]) == 3 and all(len(r) == 4 for r in act["cka"])  # embeddings + blocks
    assert all(0.0 <= v <= 1.0 + 1e-9 for row in act["cka"] for v in row)
    assert par["layers_a"] == [0, 1] and par["layers_b"] == [0, 1, 2]
    assert "self_attn.q_proj.weight" in par["modules"] and "mlp.down_proj.weight" in par["modules"]
    assert len(par["mean_abs"]) == 2 and len(par["mean_abs"][0]) == 3
    assert {"best_match", "lowest", "mean"} <= set(act["summary"])
    # independent random initialisations: parameters are far from aligned
    assert par["summary"]["mean"] < 0.5


def test_maps_are_cached(two_families, tmp_path, monkeypatch):
    from cache import MetricStore
    from engine.analysis import incompatibility

    small, large = two_families
    params = IncompatibilityParams(n_per_task=1, tasks=["lookup"])
    with MetricStore(tmp_path / "c.duckdb") as store:
        first = incompatibility_maps(small, large, params, cache=store)
        assert store.stats()["metrics"] == {"incompatibility": 1}

        def no_compute(*args, **kwargs):
            raise AssertionError("computed again instead of reading the cache")

        monkeypatch.setattr(incompatibility, "activation_similarity", no_compute)
        second = incompatibility_maps(small, large, params, cache=store)
        assert second == first
        with pytest.raises(AssertionError):  # other parameters: another key
            incompatibility_maps(small, large, IncompatibilityParams(n_per_task=2, tasks=["lookup"]),
                                 cache=store)


def test_a_model_against_itself_is_fully_similar(two_families):
    small, _ = two_families
    maps = incompatibility_maps(small, small, IncompatibilityParams(n_per_task=2, tasks=["shift"]))
    cka = np.array(maps["activation"]["cka"])
    np.testing.assert_allclose(np.diag(cka), 1.0, atol=1e-9)
    par = np.array(maps["parameters"]["mean_abs"])
    np.testing.assert_allclose(np.diag(par), 1.0, atol=1e-9)
    with pytest.raises(ParameterError):
        incompatibility_maps(small, small, IncompatibilityParams(tasks=["nope"]))
