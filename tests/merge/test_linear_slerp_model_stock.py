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


def _fp32_coefficients(t, v0, v1):
    """The coefficients as computed before float64 accumulation: normalise and sum in float32."""
    a, b = v0.float().flatten(), v1.float().flatten()
    dot = float((a / a.norm() * (b / b.norm())).sum())
    theta = math.acos(dot)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_slerp_near_colinear_large_pair_matches_float64(dtype):
    """Two fine-tunes at cos ~0.992 over 4M entries: float32 sums move cos by ~1e-4, which acos
    amplifies; the float64-accumulated coefficients agree with a float64 reference to 1e-6."""
    from engine.merge.methods.slerp import coefficients

    shape, t = (4096, 1024), 0.3
    v0 = rand(*shape, seed=11, scale=0.02) + 0.01
    v1 = (v0 + rand(*shape, seed=12, scale=0.02 * 0.145)).to(dtype)
    v0 = v0.to(dtype)
    a, b = v0.double().flatten(), v1.double().flatten()
    cos = float(a @ b / (a.norm() * b.norm()))
    assert 0.99 < cos < 0.9995  # slerp proper, not the lerp fallback
    theta = math.acos(cos)
    exact = (math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta))
    ours = coefficients(t, v0.float(), v1.float())
    for got, want in zip(ours, exact):
        assert abs(got - want) <= 1e-6 * abs(want)
    reference = (exact[0] * v0.double() + exact[1] * v1.double())
    out = get_method("slerp").merge(v0, [v1], [{}], {"t": t})
    err = float((out.double() - reference).norm() / reference.norm())
    old = _fp32_coefficients(t, v0, v1)
    old_out = old[0] * v0.float() + old[1] * v1.float()
    old_err = float((old_out.double() - reference).norm() / reference.norm())
    assert err < 1e-6 and err < old_err / 10
    if dtype == torch.bfloat16:  # after the cast back, nearly every entry is the rounded exact value
        equal = float((out.to(dtype) == reference.to(dtype)).double().mean())
        assert equal > 0.999


def test_slerp_coefficients_keep_mergekit_semantics():
    """|cos| above the threshold lerps; a tensor of norm <= eps is not normalised."""
    from engine.merge.methods.slerp import coefficients

    v0 = rand(300, seed=13)
    assert coefficients(0.25, v0, 3 * v0) == (0.75, 0.25)
    assert coefficients(0.25, v0, -2 * v0) == (0.75, 0.25)
    tiny = torch.full((300,), 1e-12)  # norm 1.7e-11 <= eps: used as is, dot ~0, theta ~pi/2
    s0, s1 = coefficients(0.5, tiny, v0)
    dot = float(tiny.double() @ v0.double() / v0.double().norm())
    theta = math.acos(dot)
    assert s0 == pytest.approx(math.sin(0.5 * theta) / math.sin(theta), rel=1e-12)
    assert s1 == pytest.approx(s0, rel=1e-9)


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
