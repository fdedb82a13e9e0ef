"""fisher and regmean against plain float64 references, plus regmean's least-squares property."""

import numpy as np
import pytest
import torch

from engine.errors import ParameterError
from engine.merge import get_method
from tests.merge.helpers import family, rand


def close(a, b, tol=2e-6):
    torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=tol)


def test_fisher_reference():
    _, fts = family(n=3, shape=(5, 4))
    fishers = [rand(5, 4, seed=20 + i).abs() for i in range(3)]
    fishers[1][0, 0] = 0.0  # floored
    weights, floor = [1.0, 0.5, 2.0], 1e-3
    out = get_method("fisher").merge(None, fts, [{"weight": w} for w in weights], {"fisher_floor": floor}, stats=fishers)
    expected = torch.empty(5, 4, dtype=torch.float64)
    for r in range(5):
        for c in range(4):
            coeff = [w * max(float(f[r, c]), floor) for w, f in zip(weights, fishers)]
            expected[r, c] = sum(k * float(ft[r, c]) for k, ft in zip(coeff, fts)) / sum(coeff)
    close(out, expected)


def test_fisher_stats_checked():
    _, fts = family(n=2)
    m = get_method("fisher")
    with pytest.raises(ParameterError, match="needs one Fisher per model"):
        m.merge(None, fts, [{}, {}])
    with pytest.raises(ParameterError, match="negative"):
        m.merge(None, fts, [{}, {}], stats=[-torch.ones(6, 5), torch.ones(6, 5)])
    with pytest.raises(ParameterError, match="shape"):
        m.merge(None, fts, [{}, {}], stats=[torch.ones(5, 6), torch.ones(6, 5)])


def grams_for(n_in, seeds, dead=None):
    xs = [rand(40, n_in, seed=s) for s in seeds]
    if dead is not None:
        for x in xs:
            x[:, dead] = 0.0
    return xs, [x.T @ x for x in xs]


def regmean_reference(fts, grams, weights, alpha, ridge):
    gs = [np.asarray(g, dtype=np.float64) for g in grams]
    scaled = [w * (alpha * g + (1 - alpha) * np.diag(np.diag(g))) for w, g in zip(weights, gs)]
    level = np.mean(np.diag(sum(scaled))) / sum(weights)
    eye = np.eye(gs[0].shape[0])
    lhs = sum(scaled) + ridge * level * sum(weights) * eye
    rhs = sum((g + ridge * level * w * eye) @ ft.double().numpy().T for g, w, ft in zip(scaled, weights, fts))
    return torch.from_numpy(np.linalg.solve(lhs, rhs).T)


@pytest.mark.parametrize("alpha, ridge", [(1.0, 0.0), (0.9, 0.0), (0.5, 1e-3), (0.0, 0.0)])
def test_regmean_reference(alpha, ridge):
    _, fts = family(n=3, shape=(4, 6))
    _, grams = grams_for(6, [30, 31, 32])
    weights = [1.0, 2.0, 0.5]
    out = get_method("regmean").merge(None, fts, [{"weight": w} for w in weights], {"alpha": alpha, "ridge": ridge}, stats=grams)
    close(out, regmean_reference(fts, grams, weights, alpha, ridge), tol=1e-4)


def test_regmean_minimises_summed_output_error():
    _, fts = family(n=2, shape=(3, 5))
    xs, grams = grams_for(5, [40, 41])
    out = get_method("regmean").merge(None, fts, [{}, {}], {"alpha": 1.0, "ridge": 0.0}, stats=grams).double()
    # gradient of sum_i |X_i W^T - X_i W_i^T|^2 in W vanishes at the optimum
    grad = sum((x.double() @ (out - ft.double()).T).T @ x.double() for x, ft in zip(xs, fts))
    assert float(grad.abs().max()) < 1e-3
    assert float((out - fts[0].double()).norm()) > 1e-3  # not trivially one of the inputs


def test_regmean_dead_feature_falls_back_to_mean_and_non_matrices_average():
    _, fts = family(n=2, shape=(3, 5))
    _, grams = grams_for(5, [50, 51], dead=2)
    out = get_method("regmean").merge(None, fts, [{}, {}], stats=grams)
    close(out[:, 2], (fts[0][:, 2].double() + fts[1][:, 2].double()) / 2, tol=1e-4)
    vec = [rand(5, seed=60), rand(5, seed=61)]
    close(get_method("regmean").merge(None, vec, [{"weight": 1}, {"weight": 3}]), (vec[0].double() + 3 * vec[1].double()) / 4)
    close(get_method("regmean").merge(None, fts, [{}, {}]), (fts[0].double() + fts[1].double()) / 2)  # no Grams given
    with pytest.raises(ParameterError, match="Gram matrix 0 has shape"):
        get_method("regmean").merge(None, fts, [{}, {}], stats=[torch.eye(3), torch.eye(5)])
