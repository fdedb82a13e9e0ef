"""nuslerp, multislerp, karcher, sce, arcee_fusion, nearswap, ram, ramplus_tl: each against a
float64 reference written here from the method's definition (plain loops, no engine code), and
against real mergekit on a tiny fp32 Llama family.

The parity tests need a mergekit venv: set MERGEKIT_YAML to its `mergekit-yaml` (or have
`mergekit-yaml` on PATH); without one they skip. The recipes go through mergekit's own
command-line entry point (one process for all of them) and through ``run_merge``.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from engine.errors import ParameterError
from engine.merge import get_method
from tests.merge.helpers import family, rand

NAME = "model.layers.0.mlp.up_proj.weight"


def merge(method, base, fts, mps, params=None):
    return get_method(method).merge(base, fts, mps, params or {}, name=NAME)


def close(got, expected, tol=1e-10):
    torch.testing.assert_close(got.double(), expected.double(), rtol=tol, atol=tol)


def f64(*tensors):
    return [t.double() for t in tensors]


# ---------------------------------------------------------------- names and defaults
def test_mergekit_names_defaults_and_model_counts():
    """mergekit 0.1.5's parameters and defaults (mergekit/merge_methods/*.py)."""
    defaults = {
        "nuslerp": {"nuslerp_row_wise": False, "nuslerp_flatten": True},
        "multislerp": {"normalize_weights": True, "eps": 1e-8},
        "karcher": {"max_iter": 10, "tol": 1e-5},
        "sce": {"select_topk": 1.0, "int8_mask": False},
        "arcee_fusion": {},
        "ram": {"epsilon": 1e-5},
        "ramplus_tl": {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5},
    }
    for name, values in defaults.items():
        assert get_method(name).parse_params({}).model_dump() == values, name
    with pytest.raises(ParameterError, match="nearswap parameters: t: Field required"):
        get_method("nearswap").parse_params({})
    for name in ("nuslerp", "multislerp"):  # per-model weight, required as in mergekit
        assert get_method(name).model_params_class.model_fields["weight"].is_required()
    for name in ("karcher", "sce", "arcee_fusion", "nearswap", "ram", "ramplus_tl"):
        assert not get_method(name).model_params_class.model_fields, name  # mergekit takes none
    counts = {name: (get_method(name).requires_base, get_method(name).max_models)
              for name in defaults | {"nearswap": {}}}
    assert counts == {"nuslerp": (False, 2), "multislerp": (False, None), "karcher": (False, None),
                      "sce": (True, None), "arcee_fusion": (True, 1), "nearswap": (True, 1),
                      "ram": (True, None), "ramplus_tl": (True, None)}


# ---------------------------------------------------------------- nuslerp
def slerp_pair(t, a, b):
    """One pair of float64 vectors (lists), as mergekit's nuslerp defines it."""
    na = max(math.sqrt(sum(x * x for x in a)), 1e-7)
    nb = max(math.sqrt(sum(x * x for x in b)), 1e-7)
    cos = max(-1.0, min(1.0, sum(x / na * y / nb for x, y in zip(a, b))))
    if 1 - cos * cos <= 1e-16:
        return [(1 - t) * x + t * y for x, y in zip(a, b)]
    theta = math.acos(cos)
    return [(math.sin((1 - t) * theta) * x + math.sin(t * theta) * y) / math.sin(theta) for x, y in zip(a, b)]


def nuslerp_reference(t, v0, v1, mode):
    """mode: 'flat' (one vector), 'rows' (each row), 'cols' (each column)."""
    v0, v1 = v0.double(), v1.double()
    out = torch.empty_like(v0)
    if mode == "flat" or v0.dim() == 1:
        out.view(-1)[:] = torch.tensor(slerp_pair(t, v0.reshape(-1).tolist(), v1.reshape(-1).tolist()), dtype=torch.float64)
    elif mode == "rows":
        for i in range(v0.shape[0]):
            out[i] = torch.tensor(slerp_pair(t, v0[i].tolist(), v1[i].tolist()), dtype=torch.float64)
    else:
        for j in range(v0.shape[1]):
            out[:, j] = torch.tensor(slerp_pair(t, v0[:, j].tolist(), v1[:, j].tolist()), dtype=torch.float64)
    return out


@pytest.mark.parametrize("mode,params", [("flat", {}), ("rows", {"nuslerp_flatten": False}),
                                         ("cols", {"nuslerp_flatten": False, "nuslerp_row_wise": True})])
@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp_against_its_definition(mode, params, with_base):
    base, fts = family(n=2, shape=(6, 5), seed=3)
    base, (a, b) = base.double(), f64(*fts)
    mps = [{"weight": 0.2}, {"weight": 0.6}]
    t = 0.6 / 0.8
    if with_base:
        expected = base + nuslerp_reference(t, a - base, b - base, mode)
        got = merge("nuslerp", base, [a, b], mps, params)
    else:
        expected = nuslerp_reference(t, a, b, mode)
        got = merge("nuslerp", None, [a, b], mps, params)
    close(got, expected)
    # float32 inputs: the same within float32 rounding
    got32 = merge("nuslerp", base.float() if with_base else None, [a.float(), b.float()], mps, params)
    close(got32, expected, tol=1e-5)


def test_nuslerp_weights_set_t_and_edge_cases():
    a, b = rand(8, seed=1).double(), rand(8, seed=2).double()
    # weights summing to zero: mergekit's t = 0.5
    close(merge("nuslerp", None, [a, b], [{"weight": 1.0}, {"weight": -1.0}]), nuslerp_reference(0.5, a, b, "flat"))
    # t = 0 and 1 are the two models; colinear vectors lerp
    close(merge("nuslerp", None, [a, b], [{"weight": 1.0}, {"weight": 0.0}]), a)
    close(merge("nuslerp", None, [a, 3 * a], [{"weight": 1.0}, {"weight": 1.0}]), 2 * a)
    with pytest.raises(ParameterError, match="at least 2"):
        merge("nuslerp", None, [a], [{"weight": 1.0}])
    with pytest.raises(ParameterError, match="weight: Field required"):
        merge("nuslerp", None, [a, b], [{}, {}])


# ---------------------------------------------------------------- multislerp
def multislerp_reference(base, fts, weights, normalize=True, eps=1e-8):
    vs = [[x - (y if base is not None else 0.0) for x, y in zip(ft.reshape(-1).tolist(),
                                                                  (base.reshape(-1).tolist() if base is not None else [0.0] * ft.numel()))]
          for ft in fts]
    if len(vs) == 1:
        return fts[0].double()
    w = [x / sum(weights) for x in weights] if normalize else list(weights)
    norms = [math.sqrt(sum(x * x for x in v)) for v in vs]
    units = [[x / (n + eps) for x in v] for v, n in zip(vs, norms)]
    m = [sum(wi * u[k] for wi, u in zip(w, units)) for k in range(len(units[0]))]
    mn = math.sqrt(sum(x * x for x in m))
    m = [x / mn for x in m]
    g = [0.0] * len(m)
    for wi, u in zip(w, units):
        dot = sum(x * y for x, y in zip(u, m))
        for k in range(len(m)):
            g[k] += wi * (u[k] - dot * m[k])
    gn = math.sqrt(sum(x * x for x in g)) + eps
    length = sum(wi * n for wi, n in zip(w, norms))
    out = [(m[k] * math.cos(gn) + g[k] * math.sin(gn) / gn) * length for k in range(len(m))]
    out = torch.tensor(out, dtype=torch.float64).reshape(fts[0].shape)
    return out + base.double() if base is not None else out


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_against_its_definition(with_base, normalize):
    base, fts = family(n=3, shape=(5, 4), seed=11)
    base, fts = base.double(), f64(*fts)
    weights = [0.5, 0.3, 0.9]
    expected = multislerp_reference(base if with_base else None, fts, weights, normalize)
    got = merge("multislerp", base if with_base else None, fts, [{"weight": w} for w in weights],
                {"normalize_weights": normalize})
    close(got, expected)


def test_multislerp_one_model_and_cancelling_vectors():
    base, (a,) = family(n=1, shape=(4, 3), seed=12)
    close(merge("multislerp", base, [a], [{"weight": 0.3}]), a, tol=0)  # returned as it is
    v = rand(6, seed=13).double()
    # antipodal task vectors with equal weights: no direction; the weighted sum (ours), here 0
    three = merge("multislerp", None, [v, -v, torch.zeros(6, dtype=torch.float64)],
                  [{"weight": 1.0}, {"weight": 1.0}, {"weight": 1.0}])
    close(three, torch.zeros(6))
    with pytest.raises(ParameterError, match="weights sum to 0"):
        merge("multislerp", None, [v, 2 * v], [{"weight": 1.0}, {"weight": -1.0}])


# ---------------------------------------------------------------- karcher
def karcher_reference(tensors, max_iter=10, tol=1e-5):
    """Plain float64 fixed point on the sphere: lists, one model at a time."""
    vs = [t.double().reshape(-1).tolist() for t in tensors]
    if len(vs) == 1:
        return tensors[0].double()
    n = len(vs)
    norms = [math.sqrt(sum(x * x for x in v)) for v in vs]
    valid = [(v, nrm) for v, nrm in zip(vs, norms) if nrm > tol]
    units = [[x / nrm for x in v] for v, nrm in valid]
    a = 1.0 / len(units)
    m = [sum(a * u[k] for u in units) for k in range(len(vs[0]))]
    mn = math.sqrt(sum(x * x for x in m))
    m = list(units[0]) if mn < tol else [x / mn for x in m]
    for _ in range(max_iter):
        step = [0.0] * len(m)
        for u in units:
            dot = max(-1.0, min(1.0, sum(x * y for x, y in zip(m, u))))
            theta = math.acos(dot)
            if theta < tol:
                continue
            for k in range(len(m)):
                step[k] += a * theta / math.sin(theta) * (u[k] - dot * m[k])
        sn = math.sqrt(sum(x * x for x in step))
        if sn < tol:
            break
        m = [math.cos(sn) * x + math.sin(sn) * s / sn for x, s in zip(m, step)]
        ln = math.sqrt(sum(x * x for x in m))
        m = [x / ln for x in m]
    scale = sum(norms) / n
    return torch.tensor([scale * x for x in m], dtype=torch.float64).reshape(tensors[0].shape)


@pytest.mark.parametrize("max_iter,tol", [(10, 1e-5), (0, 1e-5), (50, 1e-9)])
def test_karcher_against_its_definition(max_iter, tol):
    fts = [rand(5, 4, seed=20 + i).double() for i in range(3)]
    got = merge("karcher", None, fts, [{}] * 3, {"max_iter": max_iter, "tol": tol})
    close(got, karcher_reference(fts, max_iter, tol), tol=1e-9)


def test_karcher_mean_is_the_geodesic_centre_and_takes_the_base_as_an_input():
    a, b = rand(7, seed=31).double(), rand(7, seed=32).double()
    # two inputs: the geodesic midpoint of their directions, at their mean length
    mid = a / a.norm() + b / b.norm()
    close(merge("karcher", None, [a, b], [{}, {}]), mid / mid.norm() * (a.norm() + b.norm()) / 2)
    # many iterations: the tangent residual sum_i log_m(u_i) vanishes (the Karcher condition)
    fts = [rand(9, seed=40 + i).double() for i in range(4)]
    m = merge("karcher", None, fts, [{}] * 4, {"max_iter": 200, "tol": 1e-12})
    m = m / m.norm()
    residual = torch.zeros(9, dtype=torch.float64)
    for f in fts:
        u = f / f.norm()
        dot = float(u @ m)
        theta = math.acos(max(-1.0, min(1.0, dot)))
        residual += theta / math.sin(theta) * (u - dot * m)
    assert float(residual.norm()) < 1e-9
    # a base model is one more input, last (mergekit adds the base_model to the inputs)
    base = rand(9, seed=50).double()
    close(merge("karcher", base, fts, [{}] * 4), karcher_reference([*fts, base]))
    # zero tensors take no part in the direction, but count in the mean length
    zero = torch.zeros(9, dtype=torch.float64)
    close(merge("karcher", None, [fts[0], zero], [{}, {}]), fts[0] / 2)


# ---------------------------------------------------------------- sce
def sce_reference(base, fts, topk=1.0):
    b = base.double().reshape(-1).tolist()
    ds = [[x - y for x, y in zip(ft.double().reshape(-1).tolist(), b)] for ft in fts]
    n, m = len(ds), len(b)
    if topk < 1:
        variances = []
        for k in range(m):
            mean = sum(d[k] for d in ds) / n
            variances.append(sum((d[k] - mean) ** 2 for d in ds) / n)
        keep_n = int(sum(1 for v in variances if v != 0) * topk)
        order = sorted(range(m), key=lambda k: -variances[k])[:keep_n]
        keep = set(order)
        ds = [[d[k] if k in keep else 0.0 for k in range(m)] for d in ds]
    sizes = [sum(x * x for x in d) / m for d in ds]
    total = sum(sizes)
    w = [1.0 / n] * n if abs(total) < 1e-6 else [s / total for s in sizes]
    out = []
    for k in range(m):
        elected = 1.0 if sum(d[k] for d in ds) >= 0 else -1.0
        kept = [(wi, d[k]) for wi, d in zip(w, ds) if d[k] != 0 and math.copysign(1.0, d[k]) == elected]
        num = sum(wi * x for wi, x in kept)
        den = max(sum(wi for wi, _ in kept), 1e-6)
        out.append(b[k] + num / den)
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


@pytest.mark.parametrize("topk", [1.0, 0.5, 0.1, 0.0])
def test_sce_against_its_definition(topk):
    base, fts = family(n=3, shape=(6, 5), seed=60, delta_scale=0.3)
    base, fts = base.double(), f64(*fts)
    close(merge("sce", base, fts, [{}] * 3, {"select_topk": topk}), sce_reference(base, fts, topk))


def test_sce_tiny_task_vectors_weigh_equally():
    # mean squared deltas summing below 1e-6: mergekit's weights become 1/N
    base, fts = family(n=3, shape=(6, 5), seed=61, delta_scale=1e-4)
    base, fts = base.double(), f64(*fts)
    close(merge("sce", base, fts, [{}] * 3), sce_reference(base, fts))
    with pytest.raises(ParameterError, match="select_topk: Input should be less than or equal to 1"):
        merge("sce", base, fts, [{}] * 3, {"select_topk": 1.5})


# ---------------------------------------------------------------- arcee_fusion
def arcee_reference(base, model):
    b, w = base.double(), model.double()
    rows_b = b.reshape(-1, b.shape[-1]).tolist()
    rows_w = w.reshape(-1, w.shape[-1]).tolist()
    scores = []
    for rb, rw in zip(rows_b, rows_w):
        zb, zw = sum(math.exp(x) for x in rb), sum(math.exp(x) for x in rw)
        p = [math.exp(x) / zw + 1e-8 for x in rw]
        q = [math.exp(x) / zb + 1e-8 for x in rb]
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        scores.append([abs(x - y) * kl for x, y in zip(rw, rb)])
    flat = sorted(s for row in scores for s in row)
    last = len(flat) - 1
    q1, med, q3 = flat[int(0.25 * last)], flat[int(0.5 * last)], flat[int(0.75 * last)]
    threshold = med + 1.5 * (q3 - q1)
    out = [[y + (x - y) * (s >= threshold) for x, y, s in zip(rw, rb, rs)]
           for rw, rb, rs in zip(rows_w, rows_b, scores)]
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


@pytest.mark.parametrize("shape", [(12, 9), (40,), (3, 4, 5)])
def test_arcee_fusion_against_its_definition(shape):
    base = rand(*shape, seed=70)
    model = base + rand(*shape, seed=71, scale=0.3) * (rand(*shape, seed=72) > 0.5)
    got = merge("arcee_fusion", base.double(), [model.double()], [{}])
    expected = arcee_reference(base, model)
    close(got, expected)
    kept = (got != base.double()).float().mean()
    assert 0 < float(kept) < 0.5  # an upper fence keeps the few most important changes
    with pytest.raises(ParameterError, match="at most 1"):
        merge("arcee_fusion", base, [model, model], [{}, {}])


# ---------------------------------------------------------------- nearswap
@pytest.mark.parametrize("t", [0.0, 0.05, 0.3, 10.0])
def test_nearswap_against_its_definition(t):
    base, (model,) = family(n=1, shape=(6, 5), seed=80, delta_scale=0.2)
    expected = [
        (lambda w: w * y + (1 - w) * x)(min(1.0, max(0.0, t / max(abs(x - y), 1e-6))))
        for x, y in zip(base.double().reshape(-1).tolist(), model.double().reshape(-1).tolist())]
    got = merge("nearswap", base.double(), [model.double()], [{}], {"t": t})
    close(got, torch.tensor(expected, dtype=torch.float64).reshape(6, 5))
    # no entry moves by more than t
    assert float((got - base.double()).abs().max()) <= t + 1e-12


def test_nearswap_needs_a_non_negative_t():
    base, (model,) = family(n=1, seed=81)
    with pytest.raises(ParameterError, match="t: Field required"):
        merge("nearswap", base, [model], [{}])
    with pytest.raises(ParameterError, match="t: Input should be greater than or equal to 0"):
        merge("nearswap", base, [model], [{}], {"t": -0.1})


# ---------------------------------------------------------------- ram / ramplus_tl
def sparse_family(n=3, shape=(8, 6), seed=90, keep=0.4):
    """Task vectors that are sparse and partly overlapping (the RL setting RAM is for)."""
    base = rand(*shape, seed=seed)
    fts = [base + rand(*shape, seed=seed + 1 + i, scale=0.1) * (rand(*shape, seed=seed + 10 + i).abs() < keep)
           for i in range(n)]
    return base.double(), f64(*fts)


def ram_reference(base, fts, epsilon=1e-5, r=None, alpha=None):
    b = base.reshape(-1).tolist()
    ds = [[x - y for x, y in zip(ft.reshape(-1).tolist(), b)] for ft in fts]
    changed = [[abs(x) > epsilon for x in d] for d in ds]
    counts = [sum(c[k] for c in changed) for k in range(len(b))]
    lam = [1.0] * len(ds)
    if r is not None:
        for i, c in enumerate(changed):
            shared = sum(1 for k in range(len(b)) if c[k] and counts[k] > 1)
            unique = sum(1 for k in range(len(b)) if c[k] and counts[k] == 1)
            rho = shared / max(unique, epsilon)
            lam[i] = 1 + r * min(max(rho, 0.0), alpha)
    out = []
    for k in range(len(b)):
        moves = [(i, d[k]) for i, d in enumerate(ds) if changed[i][k]]
        if len(moves) == 1:
            out.append(b[k] + lam[moves[0][0]] * moves[0][1])
        elif moves:
            out.append(b[k] + sum(x for _, x in moves) / len(moves))
        else:
            out.append(b[k])
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


@pytest.mark.parametrize("epsilon", [1e-5, 0.05])
def test_ram_against_its_definition(epsilon):
    base, fts = sparse_family()
    got = merge("ram", base, fts, [{}] * 3, {"epsilon": epsilon})
    close(got, ram_reference(base, fts, epsilon))


@pytest.mark.parametrize("r,alpha", [(0.1, 0.2), (0.5, 1.0), (1.0, 5.0)])
def test_ramplus_tl_against_its_definition(r, alpha):
    base, fts = sparse_family(keep=0.6)
    got = merge("ramplus_tl", base, fts, [{}] * 3, {"r": r, "alpha": alpha})
    close(got, ram_reference(base, fts, 1e-5, r, alpha))
    assert not torch.allclose(got, merge("ram", base, fts, [{}] * 3))  # the boost did something


def test_ramplus_tl_with_epsilon_zero_and_no_unique_entry_stays_finite():
    # mergekit divides 0 shared by 0 unique here and writes NaN; a model with no unique entry
    # has nothing to scale
    base = rand(4, 4, seed=95).double()
    delta = rand(4, 4, seed=96).double()
    got = merge("ramplus_tl", base, [base + delta, base + delta], [{}, {}], {"epsilon": 0.0})
    close(got, base + delta)


# ---------------------------------------------------------------- parity with mergekit
def mergekit_yaml() -> str | None:
    exe = os.environ.get("MERGEKIT_YAML") or shutil.which("mergekit-yaml")
    return exe if exe and Path(exe).is_file() else None


def build_llama_family(root: Path) -> dict[str, Path]:
    """A tiny fp32 Llama base and three fine-tunes with sparse, partly overlapping deltas."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).to(torch.float32)
    folders = {"base": root / "base"}
    base.save_pretrained(folders["base"], safe_serialization=True)
    state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    for i in range(3):
        g = torch.Generator().manual_seed(100 + i)
        ft = {}
        for name, w in state.items():
            scale = float(w.abs().mean().clamp(min=1e-3))
            delta = torch.randn(w.shape, generator=g) * 0.3 * scale
            ft[name] = w + delta * (torch.rand(w.shape, generator=g) < 0.4)
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(ft, strict=False)
        folders[f"ft{i}"] = root / f"ft{i}"
        model.save_pretrained(folders[f"ft{i}"], safe_serialization=True)
    return folders


def parity_recipes(f: dict[str, Path]) -> dict[str, dict]:
    base, a, b, c = (str(f[k]) for k in ("base", "ft0", "ft1", "ft2"))
    fp32 = {"dtype": "float32"}

    def with_weights(*pairs):
        return [{"model": m, "parameters": {"weight": w}} for m, w in pairs]

    return {
        "nuslerp": {"merge_method": "nuslerp", "base_model": base, "models": with_weights((a, 0.7), (b, 0.3)), **fp32},
        "nuslerp_rows": {"merge_method": "nuslerp", "base_model": base, "models": with_weights((a, 0.4), (b, 0.6)),
                         "parameters": {"nuslerp_flatten": False}, **fp32},
        "nuslerp_cols_no_base": {"merge_method": "nuslerp", "models": with_weights((a, 0.5), (b, 0.5)),
                                 "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}, **fp32},
        "multislerp": {"merge_method": "multislerp", "base_model": base,
                       "models": with_weights((a, 0.5), (b, 0.3), (c, 0.2)), **fp32},
        "multislerp_no_base": {"merge_method": "multislerp", "models": with_weights((a, 1.0), (b, 2.0)),
                               "parameters": {"normalize_weights": True}, **fp32},
        "karcher": {"merge_method": "karcher", "models": [{"model": m} for m in (a, b, c)],
                    "parameters": {"max_iter": 20, "tol": 1e-6}, **fp32},
        "karcher_with_base": {"merge_method": "karcher", "base_model": base, "models": [{"model": m} for m in (a, b)],
                              **fp32},
        "sce": {"merge_method": "sce", "base_model": base, "models": [{"model": m} for m in (a, b, c)],
                "parameters": {"select_topk": 0.5}, **fp32},
        "sce_all": {"merge_method": "sce", "base_model": base, "models": [{"model": m} for m in (a, b)], **fp32},
        "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": base, "models": [{"model": a}], **fp32},
        "nearswap": {"merge_method": "nearswap", "base_model": base, "models": [{"model": a}],
                     "parameters": {"t": 0.002}, **fp32},
        "ram": {"merge_method": "ram", "base_model": base, "models": [{"model": m} for m in (a, b, c)], **fp32},
        "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": base, "models": [{"model": m} for m in (a, b, c)],
                       "parameters": {"r": 0.5, "alpha": 0.5}, **fp32},
    }


# mergekit's own command-line entry point, once per recipe, in one process of its venv
DRIVER = """
import sys
from mergekit.scripts.run_yaml import main
args = sys.argv[1:]
for recipe, out in zip(args[::2], args[1::2]):
    main([recipe, out, "--allow-crimes", "--no-lazy-unpickle", "--quiet", "--random-seed", "0"],
         standalone_mode=False)
"""


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                out[name] = handle.get_tensor(name)
    return out


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    exe = mergekit_yaml()
    if exe is None:
        pytest.skip("no mergekit venv (set MERGEKIT_YAML to its mergekit-yaml)")
    root = tmp_path_factory.mktemp("mk_methods")
    folders = build_llama_family(root / "models")
    recipes = parity_recipes(folders)
    args = []
    for name, recipe in recipes.items():
        path = root / "recipes" / f"{name}.yml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        args += [str(path), str(root / "mergekit" / name)]
    python = Path(exe).parent / "python"
    proc = subprocess.run([str(python), "-c", DRIVER, *args], capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                               "CUDA_VISIBLE_DEVICES": ""})
    if proc.returncode != 0:
        raise RuntimeError(f"mergekit failed:\n{proc.stderr[-4000:]}")
    return root, recipes


@pytest.mark.parametrize("name", sorted(parity_recipes({k: Path(k) for k in ("base", "ft0", "ft1", "ft2")})))
def test_matches_mergekit(parity, name):
    import warnings

    from engine.merge.executor import run_merge
    from engine.recipe import load_recipe

    root, _ = parity
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # parameters a method ignores, as mergekit does
        run_merge(load_recipe(root / "recipes" / f"{name}.yml"), root / "ours" / name, device="cpu")
    ours, theirs = load_tensors(root / "ours" / name), load_tensors(root / "mergekit" / name)
    assert sorted(ours) == sorted(theirs)
    base = load_tensors(root / "models" / "base")
    moved = 0
    for tensor, t in theirs.items():
        assert ours[tensor].dtype == t.dtype and ours[tensor].shape == t.shape
        o, t = ours[tensor].double(), t.double()
        scale = float(t.abs().max()) or 1.0
        diff = float((o - t).abs().max())
        assert diff <= 1e-4 * scale, f"{name} {tensor}: max |ours - mergekit| {diff:.3g}, max |mergekit| {scale:.3g}"
        moved += int(not torch.equal(t, base[tensor].double()))
    assert moved > 0  # the recipe changed something: not a comparison of two copies of the base


# ---------------------------------------------------------------- a base listed among the models
@pytest.mark.parametrize("method,weights,params", [
    ("karcher", False, {}), ("nuslerp", True, {}), ("multislerp", True, {})])
def test_a_base_model_listed_among_the_models_is_the_base(tmp_path, method, weights, params):
    """mergekit: a base_model listed in `models` is the base (its per-model values unused), not
    one more model; karcher then averages it once, nuslerp and multislerp take the others."""
    import warnings

    from engine.merge.executor import run_merge
    from engine.recipe import parse_recipe
    from tests.io.builders import tiny_tensors, write_model

    folders = {n: write_model(tmp_path / n, tiny_tensors(seed=i)) for i, n in enumerate(("base", "a", "b"))}

    def entry(n, w):
        return {"model": str(folders[n]), **({"parameters": {"weight": w}} if weights else {})}

    plain = {"merge_method": method, "base_model": str(folders["base"]), "parameters": params,
             "models": [entry("a", 0.3), entry("b", 0.7)]}
    listed = {**plain, "models": [*plain["models"], entry("base", 0.5)]}
    outs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, recipe in enumerate((plain, listed)):
            outs.append(load_tensors(run_merge(parse_recipe(recipe), tmp_path / f"out{i}").out))
    assert sorted(outs[0]) == sorted(outs[1])
    for name in outs[0]:
        assert torch.equal(outs[0][name], outs[1][name]), name


def test_nuslerp_near_colinear_rows_follow_the_float64_slerp():
    """Rows at cos ~0.999: float32 dot products would move theta by ~1e-6 relative; ours sums
    norms and dots in float64, so the output matches a float64 slerp of each row."""
    from engine.merge.methods.nuslerp import nuslerp

    gen = torch.Generator().manual_seed(7)
    a = torch.randn(64, 4096, generator=gen)
    b = a + 0.04 * torch.randn(64, 4096, generator=gen)
    t = 0.3
    out = nuslerp(t, a, b, row_wise=False, flatten=False).double()
    x, y = a.double(), b.double()
    cos = (x * y).sum(-1, keepdim=True) / (x.norm(dim=-1, keepdim=True) * y.norm(dim=-1, keepdim=True))
    theta = torch.acos(cos)
    exact = (torch.sin((1 - t) * theta) * x + torch.sin(t * theta) * y) / torch.sin(theta)
    assert float(cos.min()) > 0.998
    assert float((out - exact).abs().max() / exact.abs().max()) < 1e-6
