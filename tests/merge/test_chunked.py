"""The chunked CPU kernels give the methods' own results, threshold ties and all."""

from __future__ import annotations

import pytest
import torch

from engine.errors import NonFiniteError
from engine.merge import chunked, get_method
from engine.merge.chunked import TopK, select_topk
from engine.merge.sparsify import topk_mask


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(chunked, "CHUNK", 1000)  # many chunks even on small tensors
    monkeypatch.setattr(chunked, "_SAMPLE", 256)


def quantized_family(n_models=3, shape=(37, 53), seed=0, dtype=torch.bfloat16):
    """bf16 base and fine-tunes with coarse deltas: many equal magnitudes (threshold ties)."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    fts = []
    for _ in range(n_models):
        delta = torch.randint(-6, 7, shape, generator=g).float() * 2 ** -10
        fts.append((base.float() + delta).to(dtype))
    return base, fts


def _reference(method, base, fts, mps, params):
    m = get_method(method)
    return m.merge(base, fts, mps, params)


CASES = [
    ("linear", [{"weight": 0.6}, {"weight": 0.3}, {"weight": 0.1}], {}),
    ("linear", [{"weight": 2.0}, {"weight": -0.5}, {"weight": 1.0}], {"normalize": False}),
    ("task_arithmetic", [{"weight": 0.7}, {"weight": 0.5}, {"weight": -0.2}], {"lambda": 0.9}),
    ("task_arithmetic", [{"weight": 0.5}, {"weight": 0.5}, {"weight": 0.25}], {"normalize": True}),
    ("ties", [{"weight": 1.0, "density": 0.5}, {"weight": 0.8, "density": 0.7}, {"weight": 0.5, "density": 0.3}], {}),
    ("ties", [{"weight": 0.6, "density": 0.4}] * 3, {"normalize": False, "int8_mask": True, "lambda": 1.3}),
    ("ties", [{"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 1.0}, {"weight": 0.3, "density": 0.01}],
     {"consensus_method": "count"}),
    # a negative weight: a divisor can be negative, so a zero one becomes 1 (not clamped)
    ("ties", [{"weight": 1.0, "density": 0.6}, {"weight": -0.5, "density": 0.5}, {"weight": 0.7, "density": 0.8}], {}),
    ("breadcrumbs", [{"weight": 0.6, "density": 0.8, "gamma": 0.05}, {"weight": 0.4, "density": 0.7, "gamma": 0.02},
                     {"weight": 0.4, "density": 0.97, "gamma": 0.1}], {}),
    ("breadcrumbs_ties", [{"weight": 0.6, "density": 0.8, "gamma": 0.05}, {"weight": 0.4, "density": 0.7, "gamma": 0.0},
                          {"weight": 0.4, "density": 0.5}], {"normalize": True}),
]


@pytest.mark.parametrize("method, mps, params", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_chunked_kernel_equals_the_method(method, mps, params, dtype):
    base, fts = quantized_family(dtype=dtype)
    m = get_method(method)
    p, parsed = m.parse_params(params), m.parse_model_params(mps)
    assert chunked.supports(m, p)
    expected = m.merge(base, fts, parsed, p)
    out = torch.empty(base.shape, dtype=torch.float32)
    chunked.merge_into(m, base if m.requires_base else None, fts, parsed, p, out)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out16 = torch.empty(base.shape, dtype=torch.bfloat16)
    chunked.merge_into(m, base if m.requires_base else None, fts, parsed, p, out16)
    assert torch.equal(out16, expected.to(torch.bfloat16))


@pytest.mark.parametrize("k", [0, 1, 2, 17, 500, 1000, 1961, 1999, 2000, 2500])
def test_select_topk_matches_a_full_selection(k):
    base, (ft, *_) = quantized_family(shape=(40, 50))
    rule = select_topk(base.reshape(-1), ft.reshape(-1), k)
    mag = (ft.float() - base.float()).abs().reshape(-1)
    if k >= mag.numel():
        assert rule.everything
        return
    if k <= 0:
        assert rule.nothing
        return
    expected = topk_mask(mag, k)
    got = torch.cat([chunked.topk_mask(rule, mag[s:e], c)
                     for c, (s, e) in enumerate(chunked._chunks(mag.numel()))])
    assert int(got.sum()) == k
    assert torch.equal(got, expected)


def test_one_pass_for_many_requests_gives_each_alone(monkeypatch):
    """select_many: several models, two k of one model (Breadcrumbs), k that keep all or
    none, in one pass over two threads; each TopK is select_topk's for that request alone,
    and its masks are the full selection's."""
    monkeypatch.setattr(chunked, "SPLIT_MIN_CHUNKS", 2)
    base, (a, b, c) = quantized_family(shape=(60, 70))
    flat = base.reshape(-1)
    requests = [(a.reshape(-1), 1000), (b.reshape(-1), 2999), (a.reshape(-1), 17), (c.reshape(-1), 0),
                (b.reshape(-1), 4200), (c.reshape(-1), 2100)]
    rules = chunked.select_many(flat, requests)
    assert rules == [select_topk(flat, model, k) for model, k in requests]
    assert rules[3].nothing and rules[4].everything
    for (model, k), rule in zip(requests, rules):
        if rule.nothing or rule.everything:
            continue
        mag = (model.float() - flat.float()).abs()
        got = torch.cat([chunked.topk_mask(rule, mag[s:e], i) for i, (s, e) in enumerate(chunked._chunks(mag.numel()))])
        assert torch.equal(got, topk_mask(mag, k))


def test_bracket_miss_falls_back_to_exact_selection(monkeypatch):
    monkeypatch.setattr(chunked, "_SAMPLE", 2)  # a useless sample
    base, (ft, *_) = quantized_family(shape=(30, 30))
    mag = (ft.float() - base.float()).abs().reshape(-1)
    for k in (1, 100, 450, 899):
        rule = select_topk(base.reshape(-1), ft.reshape(-1), k)
        assert isinstance(rule, TopK)
        assert torch.equal(torch.cat([chunked.topk_mask(rule, mag[s:e], c)
                                      for c, (s, e) in enumerate(chunked._chunks(mag.numel()))]),
                           topk_mask(mag, k))


def test_unsupported_settings_are_declined():
    for name, params in (("della", {}), ("della_linear", {}), ("ties", {"rescale": True})):
        m = get_method(name)
        assert not chunked.supports(m, m.parse_params(params))
    dare = get_method("dare_ties")  # DARE's random drops, rescaled or not
    assert chunked.supports(dare, dare.parse_params({})) and chunked.supports(dare, dare.parse_params({"rescale": False}))
    stock = get_method("model_stock")
    assert chunked.supports(stock, stock.parse_params({}), 2)
    assert not chunked.supports(stock, stock.parse_params({"filter_wise": True}), 2)
    slerp = get_method("slerp")  # one model besides the base, or the method refuses it
    assert chunked.supports(slerp, slerp.parse_params({"t": 0.5}), 1)
    assert not chunked.supports(slerp, slerp.parse_params({"t": 0.5}), 2)


def test_nonfinite_inputs_are_named_and_huge_finite_sums_are_not_errors():
    base, fts = quantized_family(dtype=torch.float32)
    fts[1][3, 4] = float("nan")
    m = get_method("ties")
    mps = m.parse_model_params([{"weight": 1.0, "density": 0.5}] * 3)
    with pytest.raises(NonFiniteError, match="model-b: tensor 'w': 1 NaN/Inf value\\(s\\) in an input"):
        chunked.merge_into(m, base, fts, mps, m.parse_params({}), torch.empty(base.shape),
                        labels=["base", "model-a", "model-b", "model-c"], name="w")
    big = [torch.full((50, 50), 3e37), torch.full((50, 50), 3e37)]  # sums overflow fp32, values do not
    lin = get_method("linear")
    out = chunked.merge_into(lin, None, big, lin.parse_model_params([{"weight": 1}, {"weight": 1}]),
                          lin.parse_params({}), torch.empty(50, 50))
    torch.testing.assert_close(out, big[0])


@pytest.mark.parametrize("method, mps, params", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_two_threads_give_the_one_thread_result_bit_for_bit(method, mps, params, monkeypatch):
    base, fts = quantized_family(shape=(61, 97))  # 6 chunks of 1000 entries
    m = get_method(method)
    p, parsed = m.parse_params(params), m.parse_model_params(mps)
    use_base = base if m.requires_base else None
    monkeypatch.setattr(chunked, "workers", lambda: 1)
    alone = chunked.merge_into(m, use_base, fts, parsed, p, torch.empty(base.shape, dtype=torch.bfloat16))
    monkeypatch.setattr(chunked, "workers", lambda: 2)
    monkeypatch.setattr(chunked, "SPLIT_MIN_CHUNKS", 2)
    calls = []
    real = chunked._split
    monkeypatch.setattr(chunked, "_split", lambda n, fn, parallel=True: calls.append(parallel) or real(n, fn))
    split = chunked.merge_into(m, use_base, fts, parsed, p, torch.empty(base.shape, dtype=torch.bfloat16))
    assert calls and torch.equal(split, alone)
    assert torch.equal(split, m.merge(base, fts, parsed, p).to(torch.bfloat16))


def test_an_error_in_the_helper_half_is_raised_after_both_halves_ended(monkeypatch):
    monkeypatch.setattr(chunked, "workers", lambda: 2)
    seen = []

    def fn(lo, hi):
        seen.append((lo, hi))
        if lo > 0:
            raise ValueError("helper failed")
        return lo

    with pytest.raises(ValueError, match="helper failed"):
        chunked._split(20 * chunked.CHUNK, fn)
    assert sorted(seen) == [(0, 10), (10, 20)]


def test_cast_overflow_is_reported_for_the_exact_check():
    lin = get_method("linear")
    mps = lin.parse_model_params([{"weight": 1}, {"weight": 1}])
    fine = [torch.full((40, 50), 2.0), torch.full((40, 50), 4.0)]
    out = torch.empty(40, 50, dtype=torch.float16)
    assert chunked.merge_checked(lin, None, fine, mps, lin.parse_params({}), out) is True
    big = [torch.full((40, 50), 1e5), torch.full((40, 50), 1e5)]  # finite in fp32, Inf in fp16
    assert chunked.merge_checked(lin, None, big, mps, lin.parse_params({}), out) is False
    assert bool(torch.isinf(out).all())


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("colinear", [False, True])
def test_chunked_slerp_equals_the_method_and_a_float64_reference(t, colinear, monkeypatch):
    import math

    monkeypatch.setattr(chunked, "SPLIT_MIN_CHUNKS", 2)
    monkeypatch.setattr(chunked, "workers", lambda: 2)
    base, (ft, *_) = quantized_family(shape=(61, 97))
    if colinear:  # |cos| above the threshold: the lerp weights
        ft = (base.float() * 1.5).to(torch.bfloat16)
    m = get_method("slerp")
    p = m.parse_params({"t": t})
    mps = m.parse_model_params([{}])
    out = torch.empty(base.shape, dtype=torch.float32)
    chunked.merge_into(m, base, [ft], mps, p, out)
    torch.testing.assert_close(out, m.merge(base, [ft], mps, p), rtol=1e-6, atol=1e-9)
    a, b = base.double().flatten(), ft.double().flatten()
    dot = float(a @ b / (a.norm() * b.norm()))
    if abs(dot) > 0.9995:
        expected = (1 - t) * base.double() + t * ft.double()
    else:
        theta = math.acos(dot)
        expected = (math.sin((1 - t) * theta) * base.double() + math.sin(t * theta) * ft.double()) / math.sin(theta)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_slerp_skips_the_finiteness_sums_only_where_its_norms_prove_every_result_finite(dtype, monkeypatch):
    """|w0 b + w1 m| <= |w0| |b| + |w1| |m| bounds every entry: below half the output dtype's
    largest value the results are stored unsummed (the same values), above it they are summed
    and a cast overflow is still reported for the exact check."""
    m = get_method("slerp")
    p, mps = m.parse_params({"t": 0.4}), m.parse_model_params([{}])
    base, (ft, *_) = quantized_family(shape=(61, 97))
    summed = []
    real_store = chunked._store
    monkeypatch.setattr(chunked, "_store", lambda *a: summed.append(1) or real_store(*a))
    fast = torch.empty(base.shape, dtype=dtype)
    assert chunked.merge_checked(m, base, [ft], mps, p, fast) is True
    assert summed == []
    monkeypatch.setattr(chunked, "PROVEN_FINITE", 0.0)  # never proven: every chunk summed
    checked = torch.empty(base.shape, dtype=dtype)
    assert chunked.merge_checked(m, base, [ft], mps, p, checked) is True
    assert summed and torch.equal(fast, checked)
    monkeypatch.setattr(chunked, "PROVEN_FINITE", 0.5)
    scale = torch.finfo(dtype).max / 4 if dtype == torch.float16 else 1e37
    big_base, big_ft = base.float() * 0 + scale, ft.float() * 0 + scale  # colinear: the lerp
    out = torch.empty(base.shape, dtype=dtype)
    known = chunked.merge_checked(m, big_base, [big_ft], mps, p, out)
    assert bool(torch.isfinite(out).all()) and (known is True or dtype != torch.float32)
    huge = torch.empty(base.shape, dtype=torch.float16)
    overflow = [x.float() * 0 + 1e5 for x in (base, ft)]  # finite in fp32, Inf in fp16
    assert chunked.merge_checked(m, overflow[0], [overflow[1]], mps, p, huge) is False
    assert bool(torch.isinf(huge).all())


def test_chunked_slerp_names_a_nonfinite_input():
    base, (ft, *_) = quantized_family(dtype=torch.float32)
    ft[2, 2] = float("inf")
    m = get_method("slerp")
    with pytest.raises(NonFiniteError, match="model-a"):
        chunked.merge_into(m, base, [ft], m.parse_model_params([{}]), m.parse_params({"t": 0.4}),
                           torch.empty(base.shape), labels=["base", "model-a"], name="w")


@pytest.mark.parametrize("n_models", [2, 3])
def test_chunked_model_stock_equals_the_method(n_models):
    base, fts = quantized_family(n_models=n_models, shape=(61, 97))
    m = get_method("model_stock")
    p, mps = m.parse_params({}), m.parse_model_params([{}] * n_models)
    expected = m.merge(base, fts, mps, p)
    out = torch.empty(base.shape, dtype=torch.float32)
    chunked.merge_into(m, base, fts, mps, p, out)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-9)
    out16 = torch.empty(base.shape, dtype=torch.bfloat16)
    chunked.merge_into(m, base, fts, mps, p, out16)
    assert (out16.float() - expected.to(torch.bfloat16).float()).abs().max() <= 2 ** -7 * expected.abs().max()


DARE_CASES = [
    ("dare_linear", [{"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.7}, {"weight": 0.3, "density": 1.0}], {}),
    ("dare_linear", [{"weight": 0.6, "density": 0.5}] * 3, {"rescale": False}),
    ("dare_ties", [{"weight": 1.0, "density": 0.5}, {"weight": 0.8, "density": 0.3}, {"weight": 0.5, "density": 0.9}], {}),
    ("dare_ties", [{"weight": 0.6, "density": 0.4}] * 3, {"rescale_norm": "keep_probability"}),
    ("dare_ties", [{"weight": 0.6, "density": 0.4, "seed": 11}, {"weight": 0.6, "density": 0.4},
                   {"weight": 0.6, "density": 0.4, "seed": 12}], {"consensus_method": "count"}),
]


@pytest.mark.parametrize("method, mps, params", DARE_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(DARE_CASES)])
@pytest.mark.parametrize("shared", [True, False])
def test_chunked_dare_draws_the_methods_masks(method, mps, params, shared):
    base, fts = quantized_family(shape=(61, 97))
    m = get_method(method)
    p, parsed = m.parse_params(params), m.parse_model_params(mps)
    assert chunked.supports(m, p)

    def generator():
        return torch.Generator().manual_seed(1234) if shared else None

    expected = m.merge(base, fts, parsed, p, name="w", generator=generator())
    out = torch.empty(base.shape, dtype=torch.float32)
    chunked.merge_into(m, base, fts, parsed, p, out, name="w", generator=generator())
    # the same drops: exactly the same zeros; the values up to the float64 L1 factor's rounding
    assert torch.equal(out == base.float(), expected == base.float())
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-9)


def test_chunked_dare_rewinds_its_draws_for_the_exact_overflow_look():
    lin = get_method("dare_linear")
    mps = lin.parse_model_params([{"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}])
    base = torch.zeros(40, 50)
    big = [torch.full((40, 50), 4e4), torch.full((40, 50), 4e4)]  # finite in fp32, Inf in fp16 where kept
    out = torch.empty(40, 50, dtype=torch.float16)
    checked = chunked.merge_checked(lin, base, big, mps, lin.parse_params({"rescale": False}), out, name="w",
                                    generator=torch.Generator().manual_seed(3))
    expected = lin.merge(base, big, mps, lin.parse_params({"rescale": False}), name="w",
                         generator=torch.Generator().manual_seed(3))
    assert checked is False and torch.equal(out, expected.to(torch.float16))


@pytest.mark.parametrize("method, mps, params", [("slerp", [{}], {"t": 0.5}),
                                                 ("ties", [{"weight": 1.0, "density": 0.5}], {}),
                                                 ("model_stock", [{}, {}], {})])
def test_a_method_needing_a_base_gets_its_own_error_without_one(method, mps, params):
    from engine.errors import ParameterError
    from engine.merge.executor import merge_state_dicts

    fts = [{"w": torch.randn(40, 50, generator=torch.Generator().manual_seed(i))} for i in range(len(mps))]
    with pytest.raises(ParameterError, match="needs a base"):
        merge_state_dicts(method, None, fts, mps, params)


SPHERE_CASES = [
    ("nuslerp", [{"weight": 0.7}, {"weight": 0.3}], {}, True),
    ("nuslerp", [{"weight": 1.0}, {"weight": 1.0}], {}, False),
    ("nuslerp", [{"weight": 0.2}, {"weight": 0.9}], {}, "colinear"),
    ("multislerp", [{"weight": 0.5}, {"weight": 0.3}], {}, True),
    ("multislerp", [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}], {}, True),
    ("multislerp", [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}], {}, False),
    ("multislerp", [{"weight": 2.0}, {"weight": 1.0}, {"weight": 0.5}], {"normalize_weights": False}, True),
    ("multislerp", [{"weight": 0.5}, {"weight": 0.5}], {}, "zero"),  # no direction: the lerp
]


@pytest.mark.parametrize("method, mps, params, with_base", SPHERE_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(SPHERE_CASES)])
def test_chunked_nuslerp_and_multislerp_equal_the_method(method, mps, params, with_base, monkeypatch):
    """One Gram pass and one combination give the whole-tensor method's result (its float32
    reductions against our float64 ones: equal to float32 rounding)."""
    monkeypatch.setattr(chunked, "SPLIT_MIN_CHUNKS", 2)
    monkeypatch.setattr(chunked, "workers", lambda: 2)
    base, fts = quantized_family(n_models=len(mps), shape=(61, 97))
    if with_base == "colinear":  # task vectors 1x and 2x: lerped
        fts = [fts[0], (base.float() + 2 * (fts[0].float() - base.float())).to(torch.bfloat16)]
    if with_base == "zero":  # every task vector zero
        fts = [base.clone() for _ in fts]
    use_base = base if with_base else None
    m = get_method(method)
    p, parsed = m.parse_params(params), m.parse_model_params(mps)
    assert chunked.supports(m, p, len(fts))
    expected = m.merge(use_base, fts, parsed, p)
    out = torch.empty(base.shape, dtype=torch.float32)
    chunked.merge_into(m, use_base, fts, parsed, p, out)
    scale = float(expected.abs().max())
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6 * scale)
    if with_base == "zero":
        assert torch.equal(out, base.float())


def test_chunked_nuslerp_declines_per_row_angles():
    m = get_method("nuslerp")
    assert chunked.supports(m, m.parse_params({}), 2)
    assert not chunked.supports(m, m.parse_params({"nuslerp_flatten": False}), 2)
    multi = get_method("multislerp")
    assert not chunked.supports(multi, multi.parse_params({}), 1)  # one model is returned as it is


def test_the_merge_spec_gives_nuslerp_its_base_on_the_chunked_path():
    """nuslerp with a base interpolates task vectors: the streaming path (which takes the
    chunked kernel on the CPU) must hand it the base, or it would interpolate the weights."""
    from engine.merge.spec import MergeSpec

    base, fts = quantized_family(n_models=2, shape=(61, 97))
    m = get_method("nuslerp")
    mps = [{"weight": 0.3}, {"weight": 0.7}]
    spec = MergeSpec.build("nuslerp", [{}], mps, num_layers=None, seed=0)
    out = torch.empty(base.shape, dtype=torch.float32)
    spec.merge_into("w", base, fts, out, device=torch.device("cpu"))
    expected = m.merge(base, fts, m.parse_model_params(mps), m.parse_params({}))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    without = m.merge(None, fts, m.parse_model_params(mps), m.parse_params({}))
    assert not torch.allclose(out, without, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("epsilon", [1e-5, 2 ** -9])
def test_chunked_ram_equals_the_method(epsilon, monkeypatch):
    """RAM chunk by chunk: the method's own per-entry rule, bit for bit (shared, unique and
    unchanged entries all present: the quantized deltas are often zero or equal)."""
    monkeypatch.setattr(chunked, "SPLIT_MIN_CHUNKS", 2)
    base, fts = quantized_family(n_models=3, shape=(61, 97))
    m = get_method("ram")
    p, mps = m.parse_params({"epsilon": epsilon}), m.parse_model_params([{}] * 3)
    assert chunked.supports(m, p, 3)
    expected = m.merge(base, fts, mps, p)
    counts = (torch.stack([f.float() - base.float() for f in fts]).abs() > epsilon).sum(dim=0)
    assert {0, 1, 2} <= set(counts.unique().tolist())
    out = torch.empty(base.shape, dtype=torch.float32)
    chunked.merge_into(m, base, fts, mps, p, out)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("density", [0.3, 0.5, 0.7])
def test_chunks_before_the_cut_keep_all_their_threshold_ties(density):
    """Ten chunks of heavy ties: those before the cut keep every tie (hardshrink just below
    the threshold), the cut's chunk keeps the first ones; the result is the method's."""
    base, fts = quantized_family(shape=(100, 100))
    m = get_method("ties")
    p, parsed = m.parse_params({}), m.parse_model_params([{"weight": 1.0, "density": density}] * 3)
    out = torch.empty(base.shape, dtype=torch.float32)
    chunked.merge_into(m, base, fts, parsed, p, out)
    torch.testing.assert_close(out, m.merge(base, fts, parsed, p), rtol=0, atol=0)


STATS_CASES = [
    ("sce", 2, {}), ("sce", 3, {}), ("sce", 3, {"int8_mask": True}), ("sce", 2, "zero"),
    ("ramplus_tl", 2, {}), ("ramplus_tl", 3, {"r": 0.5, "alpha": 0.5}),
    ("ramplus_tl", 3, {"r": 0.3, "alpha": 2.0, "epsilon": 2 ** -9}), ("ramplus_tl", 2, {"epsilon": 0.0}),
    ("nearswap", 1, {"t": 2 ** -9}), ("nearswap", 1, {"t": 1e-4}), ("nearswap", 1, {"t": 0.0}),
    ("nearswap", 1, {"t": 10.0}),
]


@pytest.mark.parametrize("method, n_models, params", STATS_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(STATS_CASES)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_chunked_sce_ramplus_and_nearswap_equal_the_method(method, n_models, params, dtype, monkeypatch):
    """A first pass for the per-model statistics (SCE's float64 sums of squares, RAM+'s counts),
    then the method's own functions chunk by chunk, on two threads: the whole tensor's result,
    bit for bit (the quantized deltas tie, cancel and are often zero)."""
    monkeypatch.setattr(chunked, "SPLIT_MIN_CHUNKS", 2)
    monkeypatch.setattr(chunked, "workers", lambda: 2)
    base, fts = quantized_family(n_models=n_models, shape=(61, 97), dtype=dtype)
    if params == "zero":  # every task vector zero: SCE's equal weights 1/N
        fts, params = [base.clone() for _ in fts], {}
    m = get_method(method)
    p, mps = m.parse_params(params), m.parse_model_params([{}] * n_models)
    assert chunked.supports(m, p, n_models)
    expected = m.merge(base, fts, mps, p)
    for out_dtype in (torch.float32, torch.bfloat16):
        out = torch.empty(base.shape, dtype=out_dtype)
        chunked.merge_into(m, base, fts, mps, p, out)
        assert torch.equal(out, expected.to(out_dtype)), out_dtype


def test_chunked_sce_weights_are_the_float64_sizes_of_the_whole_tensor():
    """The first pass's weights against an independent float64 computation of SCE's step 2."""
    from engine.merge.methods import sce

    base, fts = quantized_family(n_models=3, shape=(61, 97))
    d = torch.stack([f.double() - base.double() for f in fts]).reshape(3, -1)
    sizes = (d * d).mean(dim=1)
    sums = sum(chunked._square_sums(base.reshape(-1), [f.reshape(-1) for f in fts], lo, lo + 1)
               for lo in range(-(-base.numel() // chunked.CHUNK)))
    got = sce.weights_from_square_sums(sums, base.numel(), torch.float32)
    torch.testing.assert_close(got.double(), sizes / sizes.sum(), rtol=1e-7, atol=0)


def test_chunked_sce_nearswap_karcher_decline_what_they_do_not_compute():
    sce = get_method("sce")
    assert chunked.supports(sce, sce.parse_params({}), 2)
    assert not chunked.supports(sce, sce.parse_params({"select_topk": 0.5}), 2)  # a whole-tensor top-k
    near = get_method("nearswap")
    assert chunked.supports(near, near.parse_params({"t": 0.1}), 1)
    assert not chunked.supports(near, near.parse_params({"t": 0.1}), 2)
    karcher = get_method("karcher")
    assert chunked.supports(karcher, karcher.parse_params({}), 2)
    assert not chunked.supports(karcher, karcher.parse_params({}), 1)


@pytest.mark.parametrize("method, n_models, params", [("sce", 2, {}), ("ramplus_tl", 2, {}),
                                                      ("nearswap", 1, {"t": 1e-3}), ("karcher", 2, {})])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_chunked_statistics_kernels_name_a_nonfinite_input(method, n_models, params, bad):
    base, fts = quantized_family(n_models=n_models, shape=(61, 97), dtype=torch.float32)
    fts[-1][7, 11] = bad
    m = get_method(method)
    with pytest.raises(NonFiniteError, match=f"input {n_models - 1}"):
        chunked.merge_into(m, base, fts, m.parse_model_params([{}] * n_models), m.parse_params(params),
                           torch.empty(base.shape))


def _karcher_float64(inputs: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """The Karcher mean iteration over the entries in float64 (numpy), written from the
    method's description: the reference both our paths are measured against."""
    import numpy as np

    flat = np.stack([t.double().numpy().reshape(-1) for t in inputs])
    norms = np.linalg.norm(flat, axis=1)
    valid = norms > tol
    if not valid.any():
        return torch.zeros(inputs[0].shape, dtype=torch.float64)
    units = flat[valid] / norms[valid, None]
    w = np.full(len(units), 1.0 / len(units))
    mean = w @ units
    mean = units[0].copy() if np.linalg.norm(mean) < tol else mean / np.linalg.norm(mean)
    for _ in range(max_iter):
        dots = np.clip(units @ mean, -1.0, 1.0)
        theta = np.arccos(dots)
        tangent = np.zeros_like(mean)
        for i in range(len(units)):
            if theta[i] >= tol:
                tangent += w[i] * theta[i] / np.sin(theta[i]) * (units[i] - dots[i] * mean)
        if not (theta >= tol).any():
            break
        step = np.linalg.norm(tangent)
        if step < tol:
            break
        mean = np.cos(step) * mean + np.sin(step) * tangent / step
        if np.linalg.norm(mean) > tol:
            mean = mean / np.linalg.norm(mean)
    return torch.from_numpy(norms.sum() / len(flat) * mean).reshape(inputs[0].shape)


KARCHER_CASES = [(2, False, "fine-tunes"), (3, False, "fine-tunes"), (2, True, "fine-tunes"),
                 (3, False, "random"), (2, True, "random"), (3, False, "a zero input"),
                 (2, False, "antipodal"), (2, False, "all zero")]


@pytest.mark.parametrize("n_models, with_base, kind", KARCHER_CASES,
                         ids=[f"{k}-{n}{'-base' if b else ''}" for n, b, k in KARCHER_CASES])
def test_chunked_karcher_matches_a_float64_iteration_and_the_method(n_models, with_base, kind, monkeypatch):
    """One Gram pass, the iteration on N coefficients, one combination: the float64 iteration
    over the entries to ~1e-6 of the result's size, and the method's float32 pass (mergekit's
    arithmetic) to its float32 rounding."""
    monkeypatch.setattr(chunked, "SPLIT_MIN_CHUNKS", 2)
    monkeypatch.setattr(chunked, "workers", lambda: 2)
    g = torch.Generator().manual_seed(n_models * 10 + with_base)
    if kind == "fine-tunes":  # nearly parallel: arccos near 1, where float32 is least precise
        base, fts = quantized_family(n_models=n_models, shape=(61, 97), dtype=torch.float32)
    else:
        base = torch.randn(61, 97, generator=g)
        fts = [torch.randn(61, 97, generator=g) for _ in range(n_models)]
        if kind == "a zero input":
            fts[1] = torch.zeros(61, 97)
        if kind == "antipodal":
            fts[1] = -fts[0]
        if kind == "all zero":
            fts = [torch.zeros(61, 97) for _ in fts]
    m = get_method("karcher")
    p, mps = m.parse_params({}), m.parse_model_params([{}] * n_models)
    use_base = base if with_base else None
    out = torch.empty(base.shape, dtype=torch.float32)
    chunked.merge_into(m, use_base, fts, mps, p, out)
    reference = _karcher_float64(fts + ([base] if with_base else []), p.max_iter, p.tol)
    scale = max(float(reference.abs().max()), 1e-30)
    torch.testing.assert_close(out.double(), reference, rtol=0, atol=2e-6 * scale)
    expected = m.merge(use_base, fts, mps, p)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5 * max(float(expected.abs().max()), 1e-30))
    if kind == "all zero":
        assert torch.equal(out, torch.zeros_like(out))
