"""linear, slerp, model_stock against plain float64 references."""

import math

import pytest
import torch

from engine.merge import get_method
from engine.merge.params import resolve
from tests.merge.helpers import family, rand


def close(a, b, tol=2e-6):
    torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=tol)


def test_linear_reference_and_scale():
    _, fts = family(n=3)
    w = [0.2, 0.5, 1.3]
    expected = sum(wi * ft.double() for wi, ft in zip(w, fts)) / sum(w)
    close(get_method("linear").merge(None, fts, [{"weight": x} for x in w]), expected)
    raw = get_method("linear").merge(None, fts, [{"weight": x} for x in w], {"normalize": False})
    close(raw, sum(wi * ft.double() for wi, ft in zip(w, fts)))
    # weights summing to 1 keep scale: constant tensors stay that constant
    consts = [torch.full((4, 3), 2.5) for _ in range(3)]
    out = get_method("linear").merge(None, consts, [{"weight": x} for x in (0.2, 0.3, 0.5)], {"normalize": False})
    close(out, torch.full((4, 3), 2.5))


def slerp_reference(t, v0, v1):
    a, b = v0.double().flatten(), v1.double().flatten()
    dot = float((a / a.norm() * (b / b.norm())).sum())
    if abs(dot) > 0.9995:
        return ((1 - t) * v0.double() + t * v1.double())
    theta = math.acos(dot)
    return (math.sin((1 - t) * theta) * v0.double() + math.sin(t * theta) * v1.double()) / math.sin(theta)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_reference(t):
    v0, v1 = rand(6, 5, seed=1), rand(6, 5, seed=2)
    out = get_method("slerp").merge(v0, [v1], [{}], {"t": t})
    close(out, slerp_reference(t, v0, v1), tol=1e-5)


def test_slerp_keeps_unit_norm_and_falls_back_to_lerp():
    v0, v1 = rand(50, seed=3), rand(50, seed=4)
    v0, v1 = v0 / v0.norm(), v1 / v1.norm()
    out = get_method("slerp").merge(v0, [v1], [{}], {"t": 0.37})
    assert float(out.norm()) == pytest.approx(1.0, abs=1e-5)  # on the great circle, unlike lerp
    lerp = 0.63 * v0 + 0.37 * v1
    assert float(lerp.norm()) < 0.9
    colinear = get_method("slerp").merge(v0, [3 * v0], [{}], {"t": 0.25})
    close(colinear, 0.75 * v0 + 0.25 * 3 * v0)
    zero = get_method("slerp").merge(torch.zeros(5), [torch.ones(5)], [{}], {"t": 0.5})
    assert torch.isfinite(zero).all()


def test_slerp_with_layer_gradient_t():
    setting = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"value": 0.5}]
    v0, v1 = rand(4, 4, seed=5), rand(4, 4, seed=6)
    for name, layer in [("model.layers.10.self_attn.q_proj.weight", 10), ("model.layers.10.mlp.up_proj.weight", 10)]:
        t = resolve(setting, name, layer, 32)
        out = get_method("slerp").merge(v0, [v1], [{}], {"t": t}, name=name)
        close(out, slerp_reference(t, v0, v1), tol=1e-5)
    assert resolve(setting, "model.layers.10.self_attn.q_proj.weight", 10, 32) == pytest.approx(13.7 / 31)


def model_stock_reference(base, fts, rows=None):
    """rows: None = whole tensor, else per row of a 2-D tensor."""
    b = base.double()
    ws = [ft.double() for ft in fts]
    n = len(ws)
    chunks = [slice(None)] if rows is None else [r for r in range(base.shape[0])]
    out = torch.empty_like(b)
    for c in chunks:
        ds = [(w[c] - b[c]).flatten() for w in ws]
        cos = []
        for i in range(n):
            for j in range(i + 1, n):
                cos.append(max(-1.0, min(1.0, float(ds[i] @ ds[j]) / max(float(ds[i].norm() * ds[j].norm()), 1e-6))))
        c_mean = sum(cos) / len(cos)
        t = n * c_mean / (1 + (n - 1) * c_mean)
        out[c] = t * sum(w[c] for w in ws) / n + (1 - t) * b[c]
    return out


def test_model_stock_reference():
    base = rand(6, 5, seed=7)
    shared = rand(6, 5, seed=8, scale=0.1)
    fts = [base + shared + rand(6, 5, seed=9 + i, scale=0.05) for i in range(3)]  # correlated deltas
    close(get_method("model_stock").merge(base, fts, [{}] * 3), model_stock_reference(base, fts))
    close(get_method("model_stock").merge(base, fts, [{}] * 3, {"filter_wise": True}), model_stock_reference(base, fts, rows=True))


def test_model_stock_orthogonal_and_cancelling_deltas_give_base():
    base = torch.zeros(4)
    ortho = [torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0])]
    close(get_method("model_stock").merge(base, ortho, [{}] * 2), base)  # cos 0 -> t 0
    cancel = [torch.tensor([1.0, 2, 0, 0]), torch.tensor([-1.0, -2, 0, 0])]
    out = get_method("model_stock").merge(base, cancel, [{}] * 2)  # 1 + cos = 0: guarded
    close(out, base)
