"""consensus (TALL masks), tsv, emr against plain float64 references."""

import numpy as np
import pytest
import torch

from engine.errors import ParameterError
from engine.merge import get_method
from engine.merge.methods.emr import emr_decompose, emr_rebuild
from engine.merge.methods.tsv import polar_factor
from tests.merge.helpers import family, rand


def close(a, b, tol=2e-6):
    torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=tol)


def consensus_reference(base, fts, weights, lambdas, k, lam):
    b = base.double().flatten().tolist()
    ds = [[w * (x - y) for x, y in zip(ft.double().flatten().tolist(), b)] for w, ft in zip(weights, fts)]
    out = []
    for j in range(len(b)):
        total = sum(d[j] for d in ds)
        count = sum(1 for d, l in zip(ds, lambdas) if abs(d[j]) > l * abs(total - d[j]))
        out.append(b[j] + (lam * total if count >= k else 0.0))
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


@pytest.mark.parametrize("k, lam", [(2, 1.0), (1, 0.5), (0, 0.3), (3, 1.0)])
def test_consensus_reference(k, lam):
    base, fts = family(n=4, shape=(7, 6))
    weights, lambdas = [1.0, 0.8, 1.2, 1.0], [0.4, 0.3, 0.5, 0.6]
    mps = [{"weight": w, "tall_mask_lambda": l} for w, l in zip(weights, lambdas)]
    out = get_method("consensus").merge(base, fts, mps, {"k": k, "lambda": lam})
    close(out, consensus_reference(base, fts, weights, lambdas, k, lam))
    if k == 0:  # no pruning: task arithmetic
        close(out, base.double() + lam * sum(w * (ft.double() - base.double()) for w, ft in zip(weights, fts)))


def test_consensus_task_rebuilds_that_tasks_tall_mask_model():
    """task t: W0 + lambda * (m_t * d), m_t = |d_t| > lambda_t |d - d_t| (the authors' TALL mask)."""
    base, fts = family(n=3, shape=(6, 5))
    weights, lambdas = [1.0, 0.7, 1.3], [0.2, 0.5, 0.6]
    mps = [{"weight": w, "tall_mask_lambda": l} for w, l in zip(weights, lambdas)]
    b = base.double()
    ds = [w * (ft.double() - b) for w, ft in zip(weights, fts)]
    total = sum(ds)
    for t in range(3):
        mask = ds[t].abs() > lambdas[t] * (total - ds[t]).abs()
        out = get_method("consensus").merge(base, fts, mps, {"task": t, "lambda": 0.9})
        close(out, b + 0.9 * total * mask)
    with pytest.raises(ParameterError, match="task 3 out of range"):
        get_method("consensus").merge(base, fts, mps, {"task": 3})


def tsv_reference(base, fts, alpha=1.0):
    """The authors' algorithm in numpy float64: zero-padded stacks, full-SVD polar factors."""
    b = base.double().numpy()
    deltas = [ft.double().numpy() - b for ft in fts]
    if b.ndim != 2:
        return torch.from_numpy(b + alpha * np.mean(deltas, axis=0))
    r = min(b.shape)
    k = int(r / len(deltas))
    su, ss, sv = np.zeros((b.shape[0], r)), np.zeros(r), np.zeros((r, b.shape[1]))
    for i, d in enumerate(deltas):
        u, s, vt = np.linalg.svd(d, full_matrices=False)
        su[:, i * k : (i + 1) * k], ss[i * k : (i + 1) * k], sv[i * k : (i + 1) * k] = u[:, :k], s[:k], vt[:k]
    uu, _, uvt = np.linalg.svd(su, full_matrices=False)
    vu, _, vvt = np.linalg.svd(sv, full_matrices=False)
    return torch.from_numpy(b + alpha * (uu @ uvt @ np.diag(ss) @ vu @ vvt))


@pytest.mark.parametrize("shape, n", [((8, 6), 3), ((5, 9), 2), ((6, 6), 6), ((7,), 3)])
def test_tsv_reference(shape, n):
    base, fts = family(n=n, shape=shape)
    close(get_method("tsv").merge(base, fts, [{}] * n, {"alpha": 0.8}), tsv_reference(base, fts, 0.8), tol=1e-5)


def test_polar_factor_orthonormal_and_rank_deficient():
    a = rand(7, 4, seed=3)
    q = polar_factor(a)
    close(q.T @ q, torch.eye(4), tol=1e-5)
    # Procrustes: the polar factor is the closest orthonormal-column matrix, closer than the QR basis
    qr = torch.linalg.qr(a).Q
    assert float((a - q).norm()) <= float((a - qr).norm()) + 1e-6
    dup = torch.cat([q[:, :2], q[:, :2]], dim=1)  # rank 2, 4 columns
    p = polar_factor(dup)
    # [A, A] = A [I I] = (A [I I] / sqrt 2) (sqrt 2 I): the null part is dropped, not filled arbitrarily
    close(p, dup / 2**0.5, tol=1e-5)
    assert polar_factor(torch.zeros(3, 2)).eq(0).all()


def emr_reference(base, fts):
    b = base.double().flatten().tolist()
    ds = [[x - y for x, y in zip(ft.double().flatten().tolist(), b)] for ft in fts]
    n, m = len(b), len(ds)
    uni, masks = [], [[False] * n for _ in range(m)]
    for j in range(n):
        sign = 1.0 if sum(d[j] for d in ds) > 0 else -1.0
        agree = [i for i in range(m) if ds[i][j] * sign > 0]
        uni.append(sign * max([abs(ds[i][j]) for i in agree], default=0.0))
        for i in agree:
            masks[i][j] = True
    scales = []
    for i in range(m):
        den = sum(abs(u) for u, k in zip(uni, masks[i]) if k)
        scales.append(sum(abs(x) for x in ds[i]) / den if den > 0 else 1.0)
    models = [
        torch.tensor([bj + scales[i] * (u if masks[i][j] else 0.0) for j, (bj, u) in enumerate(zip(b, uni))], dtype=torch.float64).reshape(base.shape)
        for i in range(m)
    ]
    return torch.tensor(uni, dtype=torch.float64).reshape(base.shape), masks, scales, models


def test_emr_reference_decomposition_and_rebuild():
    base, fts = family(n=3, shape=(6, 7))
    uni, masks, scales, models = emr_reference(base, fts)
    dec = emr_decompose([ft - base for ft in fts])
    close(dec.unified, uni)
    for i in range(3):
        assert dec.mask(i).flatten().tolist() == masks[i]
        assert dec.packed_masks[i].dtype == torch.uint8 and dec.packed_masks[i].numel() == (42 + 7) // 8
        assert float(dec.scales[i]) == pytest.approx(scales[i], rel=1e-5)
        close(emr_rebuild(base, dec, i), models[i])
        close(get_method("emr").merge(base, fts, [{}] * 3, {"task": i}), models[i])
        # the rescaler restores the task's L1 mass
        rebuilt = emr_rebuild(base, dec, i) - base
        assert float(rebuilt.abs().sum()) == pytest.approx(float((fts[i] - base).abs().sum()), rel=1e-5)
    close(get_method("emr").merge(base, fts, [{}] * 3), sum(models) / 3)
    close(emr_rebuild(base, dec, 0, scale=2.0), base.double() + 2.0 * dec.mask(0) * uni)  # model-wide rescaler


def test_emr_zero_sum_counts_negative_and_empty_mask_is_finite():
    base = torch.zeros(3)
    fts = [torch.tensor([1.0, 2.0, 0.0]), torch.tensor([-1.0, 1.0, 0.0])]
    dec = emr_decompose(fts)
    assert dec.unified.tolist() == [-1.0, 2.0, 0.0]
    dec2 = emr_decompose([torch.tensor([1.0, 1.0]), torch.tensor([-0.1, -0.1])])
    assert dec2.mask(1).tolist() == [False, False] and float(dec2.scales[1]) == 1.0
    assert torch.isfinite(get_method("emr").merge(base, fts, [{}, {}])).all()


def _model_wide_by_hand(base: dict, fts: list[dict]) -> list[float]:
    """The authors' rescaler, by float64 loops: l_i = sum over tensors of mean|d_i| over the sum
    over tensors of mean|M_i d_uni| (emr_reference gives each tensor's d_uni and masks)."""
    num, den = [0.0] * len(fts), [0.0] * len(fts)
    for name in base:
        uni, masks, _, _ = emr_reference(base[name], [ft[name] for ft in fts])
        flat, n = uni.flatten().tolist(), base[name].numel()
        for i, ft in enumerate(fts):
            d = (ft[name].double() - base[name].double()).flatten().tolist()
            num[i] += sum(abs(x) for x in d) / n
            den[i] += sum(abs(u) for u, k in zip(flat, masks[i]) if k) / n
    return [a / b for a, b in zip(num, den)]


def _two_tensor_family():
    """Two tensors of different sizes whose per-tensor rescalers differ (so the rules disagree)."""
    b1, f1 = family(n=3, shape=(6, 7), seed=20)
    b2, f2 = family(n=3, shape=(5,), seed=40, delta_scale=0.7)
    base = {"a.weight": b1, "b.bias": b2}
    return base, [{"a.weight": x, "b.bias": y} for x, y in zip(f1, f2)]


def test_emr_model_wide_rescaler_equals_the_hand_computed_one():
    from engine.merge.executor import merge_state_dicts

    base, fts = _two_tensor_family()
    lam = _model_wide_by_hand(base, fts)
    per_tensor = {name: emr_reference(base[name], [ft[name] for ft in fts])[2] for name in base}
    assert max(abs(lam[0] - per_tensor[n][0]) for n in base) > 0.05  # the two rules differ here
    for task in range(3):
        merged = merge_state_dicts("emr", base, fts, [{}] * 3, {"task": task})
        own = merge_state_dicts("emr", base, fts, [{}] * 3, {"task": task, "rescale": "per_tensor"})
        for name in base:
            uni, masks, _, models = emr_reference(base[name], [ft[name] for ft in fts])
            mask = torch.tensor(masks[task], dtype=torch.float64).reshape(uni.shape)
            close(merged[name], base[name].double() + lam[task] * mask * uni)
            close(own[name], models[task])  # the per-tensor option: the old behaviour
    # the mean of the rebuilt models (task unset) uses the same model-wide rescalers
    mean = merge_state_dicts("emr", base, fts, [{}] * 3, {})
    for name in base:
        uni, masks, _, _ = emr_reference(base[name], [ft[name] for ft in fts])
        rebuilt = [base[name].double() + lam[i] * torch.tensor(masks[i], dtype=torch.float64)
                   .reshape(uni.shape) * uni for i in range(3)]
        close(mean[name], sum(rebuilt) / 3)


def test_emr_model_statistic_sums_per_tensor_means():
    from engine.merge.methods.emr import model_rescalers
    from engine.merge.spec import MergeSpec

    base, fts = _two_tensor_family()
    spec = MergeSpec.build("emr", [{}], [{}] * 3)
    assert spec.first_pass_names(list(base)) == list(base)
    spec.first_pass(list(base), lambda n: (base[n], [ft[n] for ft in fts]))
    assert spec.model_stat.dtype == torch.float64 and tuple(spec.model_stat.shape) == (2, 3)
    assert model_rescalers(spec.model_stat).tolist() == pytest.approx(_model_wide_by_hand(base, fts),
                                                                      rel=1e-6)
    # per_tensor needs no first pass; a model-wide merge without one is refused, not guessed
    assert MergeSpec.build("emr", [{"rescale": "per_tensor"}], [{}] * 3).first_pass_names(list(base)) == []
    fresh = MergeSpec.build("emr", [{}], [{}] * 3)
    with pytest.raises(ParameterError, match="first pass"):
        fresh.merge_tensor("a.weight", base["a.weight"], [ft["a.weight"] for ft in fts])
    with pytest.raises(ParameterError, match="rescale"):
        MergeSpec.build("emr", [{"rescale": "global"}], [{}] * 3).tensor_params("a.weight")
