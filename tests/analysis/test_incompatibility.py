"""Cross-scale maps: linear CKA against numpy, the parameter measure against a hand-computed
reference and its permutation invariance, and both maps on tiny Llama models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.analysis.incompatibility import (PARAMETER_MEASURE, IncompatibilityParams, cka_matrix,
                                             debiased_cka, incompatibility_maps, linear_cka,
                                             parameter_similarity, probe_token_ids, residual_side,
                                             token_gram, unbiased_hsic)
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


def brute_force_hsic(k: np.ndarray, l: np.ndarray) -> float:
    """The unbiased HSIC as its U-statistic, by loops over distinct index tuples:
    mean K_ij L_ij + mean K_ij L_qr - 2 mean K_ij L_iq (Song et al. 2012, Theorem 2)."""
    n = k.shape[0]
    idx = range(n)
    pairs = [(i, j) for i in idx for j in idx if i != j]
    first = sum(k[i, j] * l[i, j] for i, j in pairs) / len(pairs)
    quads = [(i, j, q, r) for i, j in pairs for q in idx for r in idx
             if len({i, j, q, r}) == 4]
    second = sum(k[i, j] * l[q, r] for i, j, q, r in quads) / len(quads)
    triples = [(i, j, q) for i, j in pairs for q in idx if q not in (i, j)]
    third = sum(k[i, j] * l[i, q] for i, j, q in triples) / len(triples)
    return first + second - 2 * third


def test_debiased_cka_of_token_grams_matches_a_hand_computed_reference():
    gen = torch.Generator().manual_seed(3)
    emb_a, emb_b = torch.randn(7, 4, generator=gen), torch.randn(7, 6, generator=gen)  # 7 tokens
    w_a = torch.randn(5, 4, generator=gen)   # reads A's 4 hidden units (columns)
    w_b = torch.randn(6, 3, generator=gen)   # writes B's 6 hidden units (rows)
    m_a = np64(w_a).T @ np64(w_a)            # hidden-side metrics, by hand, less tr/width I
    m_a -= np.trace(m_a) / 4 * np.eye(4)
    m_b = np64(w_b) @ np64(w_b).T
    m_b -= np.trace(m_b) / 6 * np.eye(6)
    k, l = np64(emb_a) @ m_a @ np64(emb_a).T, np64(emb_b) @ m_b @ np64(emb_b).T
    ka, lb = token_gram(w_a, emb_a, 1), token_gram(w_b, emb_b, 0)
    np.testing.assert_allclose(ka.numpy(), k, rtol=1e-12)
    np.testing.assert_allclose(lb.numpy(), l, rtol=1e-12)
    assert unbiased_hsic(ka, lb) == pytest.approx(brute_force_hsic(k, l), rel=1e-10)
    expected = brute_force_hsic(k, l) / np.sqrt(brute_force_hsic(k, k) * brute_force_hsic(l, l))
    assert debiased_cka(ka, lb) == pytest.approx(expected, rel=1e-10)
    # invariant to a rotation of the hidden basis (E -> E Q, W -> W Q) and of the other side
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=torch.float64))
    p, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=torch.float64))
    rotated = token_gram(p @ w_a.double() @ q, emb_a.double() @ q, 1)
    assert debiased_cka(rotated, lb) == pytest.approx(expected, rel=1e-9)
    assert debiased_cka(ka, 3.0 * ka) == pytest.approx(1.0)
    assert debiased_cka(ka, torch.zeros(7, 7, dtype=torch.float64)) is None
    with pytest.raises(ParameterError):
        unbiased_hsic(ka[:3, :3], lb[:3, :3])


def test_residual_side_by_shape_then_by_module():
    assert residual_side("mlp.up_proj.weight", (32, 16), 16) == 1     # reads: columns
    assert residual_side("mlp.down_proj.weight", (16, 32), 16) == 0   # writes: rows
    assert residual_side("self_attn.q_proj.weight", (16, 16), 16) == 1
    assert residual_side("self_attn.o_proj.weight", (16, 16), 16) == 0
    assert residual_side("attn.c_proj.weight", (16, 16), 16, conv1d=True) == 1  # GPT-2 (in, out)
    assert residual_side("attn.c_attn.weight", (16, 48), 16, conv1d=True) == 0
    assert residual_side("mlp.odd.weight", (8, 12), 16) is None
    assert probe_token_ids(50, 64).tolist() == list(range(50))
    ids = probe_token_ids(5000, 64, seed=1)
    assert ids.numel() == 64 == len(set(ids.tolist())) and ids.max() < 5000


def _permuted_copy(model, seed: int):
    """The same function with its hidden units relabelled: one permutation of the residual
    stream (embedding columns, every reader's columns, every writer's rows, the norms, the
    head's columns) and one of each block's MLP units (gate/up rows, down columns)."""
    g = torch.Generator().manual_seed(seed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    d = model.config.hidden_size
    res = torch.randperm(d, generator=g)
    out = {}
    for name, t in state.items():
        if name.endswith(("embed_tokens.weight", "lm_head.weight")) or any(
                s in name for s in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
            t = t[:, res]
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            t = t[res, :]
        elif "norm" in name:
            t = t[res]
        out[name] = t
    for i in range(model.config.num_hidden_layers):
        mlp = torch.randperm(model.config.intermediate_size, generator=g)
        prefix = f"model.layers.{i}.mlp."
        out[prefix + "gate_proj.weight"] = out[prefix + "gate_proj.weight"][mlp]
        out[prefix + "up_proj.weight"] = out[prefix + "up_proj.weight"][mlp]
        out[prefix + "down_proj.weight"] = out[prefix + "down_proj.weight"][:, mlp]
    return out


def test_parameter_map_scores_a_permuted_copy_1_and_an_unrelated_model_about_0(tmp_path):
    from engine.zoo.build import new_model, new_model_like, write_model
    from engine.zoo.plan import Arch
    from engine.evaluate.tokenizer import tokenizer_files

    tok = tokenizer_files(tmp_path / "tok")
    arch = Arch(24, 2, 2, 48)
    model = new_model(arch, seed=5).eval()
    twin = new_model_like(model)
    twin.load_state_dict(_permuted_copy(model, seed=9))
    ids = torch.tensor([[1, 7, 30, 12, 4]])
    with torch.no_grad():  # the relabelling is exact: the same logits
        torch.testing.assert_close(twin(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    other = new_model(arch, seed=6)
    for name, m in (("m", model), ("twin", twin), ("other", other)):
        write_model(tmp_path / name, m, tok, {})
    same = parameter_similarity(tmp_path / "m", tmp_path / "twin")
    assert same["measure"] == PARAMETER_MEASURE and same["tokens"] == model.config.vocab_size
    assert len(same["modules"]) == 7  # q k v o gate up down
    for values in same["modules"].values():
        np.testing.assert_allclose(np.diag(np.array(values, dtype=float)), 1.0, atol=1e-9)
    unrelated = parameter_similarity(tmp_path / "m", tmp_path / "other")
    cells = np.array([v for values in unrelated["modules"].values() for row in values for v in row])
    assert np.abs(cells).mean() < 0.05 and np.abs(cells).max() < 0.15


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
