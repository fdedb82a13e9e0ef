"""Properties every method must have (reliability item 12): self-merge, zero deltas,
permutation invariance, float32 output of the right shape, named errors on bad inputs."""

import pytest
import torch

from engine.errors import IncompatibleModelsError, NonFiniteError, ParameterError
from engine.merge import get_method, list_methods
from tests.merge.cases import generic, identity, stats_for
from tests.merge.helpers import family, rand

NAME = "model.layers.2.mlp.down_proj.weight"
METHODS = list_methods()


def pairwise(name):
    """The base and ONE other model (slerp, arcee_fusion, nearswap): merging a model with
    itself means giving it as both."""
    return get_method(name).max_models == 1


def base_of(name, base):
    """karcher averages a base given in with the models, so N copies give themselves back only
    without one."""
    return None if name == "karcher" else base


def inputs_for(name, shape=(6, 5), seed=0):
    n = len(generic(name)[0])
    base, fts = family(n=n, shape=shape, seed=seed)
    return base, fts


def merge(name, base, fts, mps, params, stats="auto"):
    if stats == "auto":
        stats = stats_for(name, fts)
    return get_method(name).merge(base, fts, mps, params, name=NAME, stats=stats)


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=tol)


@pytest.mark.parametrize("name", METHODS)
def test_merging_a_model_with_itself_gives_it_back(name):
    mps, params = identity(name)
    base = rand(6, 5, seed=1)
    if name == "tsv":  # TSV keeps 1/N of each task's rank: a delta of rank 1 survives whole
        delta = rand(6, 1, seed=2) @ rand(1, 5, seed=3) * 0.1
    else:
        delta = rand(6, 5, seed=2, scale=0.1)
    model = base + delta
    if pairwise(name):
        out = merge(name, model, [model], mps, params)
    else:
        out = merge(name, base_of(name, base), [model] * len(mps), mps, params)
    close(out, model)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("shape", [(6, 5), (7,)])
def test_zero_deltas_stay_zero(name, shape):
    mps, params = generic(name)
    base = rand(*shape, seed=4)
    out = merge(name, base, [base.clone() for _ in mps], mps, params)
    close(out, base, tol=1e-6)


@pytest.mark.parametrize("name", [m for m in METHODS if not pairwise(m)])
def test_permuting_inputs_with_their_parameters(name):
    mps, params = generic(name)
    base, fts = inputs_for(name)
    stats = stats_for(name, fts)
    perm = [len(fts) - 1, *range(len(fts) - 1)]
    out = merge(name, base, fts, mps, params, stats)
    out_p = merge(
        name, base, [fts[i] for i in perm], [mps[i] for i in perm], params, [stats[i] for i in perm] if stats else None
    )
    close(out_p, out)
    assert not torch.allclose(out, base)  # the merge did something


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("shape", [(6, 5), (7,), (2, 3, 4)])
def test_low_precision_inputs_give_finite_float32_of_the_same_shape(name, shape):
    mps, params = generic(name)
    base, fts = inputs_for(name, shape=shape, seed=5)
    out = merge(name, base.to(torch.bfloat16), [t.to(torch.bfloat16) for t in fts], mps, params, stats_for(name, fts))
    assert out.dtype == torch.float32 and out.shape == shape and torch.isfinite(out).all()


@pytest.mark.parametrize("name", METHODS)
def test_non_finite_input_is_refused_with_the_tensor_named(name):
    mps, params = generic(name)
    base, fts = inputs_for(name)
    fts[-1] = fts[-1].clone()
    fts[-1][0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=rf"tensor '{NAME}'.*non-finite"):
        merge(name, base, fts, mps, params)


@pytest.mark.parametrize("name", METHODS)
def test_shape_mismatch_and_count_mismatch(name):
    mps, params = generic(name)
    base, fts = inputs_for(name)
    bad = fts[:-1] + [rand(5, 6, seed=9)]
    with pytest.raises(IncompatibleModelsError, match="shapes differ") as info:
        merge(name, base, bad, mps, params, stats=stats_for(name, fts))
    assert info.value.tensor == NAME and info.value.reasons
    with pytest.raises(ParameterError, match="per-model parameter sets|at most|at least"):
        merge(name, base, fts + [fts[0]], mps, params, stats=None)


@pytest.mark.parametrize("name", [m for m in METHODS if get_method(m).requires_base])
def test_methods_needing_a_base_say_so(name):
    mps, params = generic(name)
    _, fts = inputs_for(name)
    with pytest.raises(ParameterError, match="needs a base model"):
        merge(name, None, fts, mps, params)


@pytest.mark.parametrize("name", METHODS)
def test_inputs_are_not_modified(name):
    mps, params = generic(name)
    base, fts = inputs_for(name, seed=6)
    stats = stats_for(name, fts)
    before = [base.clone()] + [t.clone() for t in fts] + [s.clone() for s in stats or []]
    merge(name, base, fts, mps, params, stats)
    for a, b in zip([base] + fts + list(stats or []), before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", METHODS)
def test_a_merge_never_writes_into_its_inputs(name):
    """The readers may hand out tensors that share storage between calls, so a method must
    treat base, fine-tunes and statistics as read-only: every input is bit-identical after."""
    mps, params = generic(name)
    base, fts = inputs_for(name, seed=7)
    stats = stats_for(name, fts)
    before = ([base.clone()] + [f.clone() for f in fts],
              None if stats is None else [s.clone() for s in (stats if isinstance(stats, list) else stats.grams)])
    merge(name, base, fts, mps, params, stats=stats)
    for old, new in zip(before[0], [base] + fts):
        assert torch.equal(old, new), name
    if before[1] is not None:
        now = stats if isinstance(stats, list) else stats.grams
        assert all(torch.equal(a, b) for a, b in zip(before[1], now)), name


@pytest.mark.parametrize("name", METHODS)
def test_a_float64_self_merge_is_computed_in_float64(name):
    """float64 inputs stay float64 through the method (float32 would round them at 1e-8)."""
    mps, params = identity(name)
    base = rand(6, 5, seed=1).double()
    if name == "tsv":
        delta = rand(6, 1, seed=2).double() @ rand(1, 5, seed=3).double() * 0.1
    else:
        delta = rand(6, 5, seed=2, scale=0.1).double() * (1 + 2**-40)
    model = base + delta
    fts = [model] if pairwise(name) else [model] * len(mps)
    stats = stats_for(name, fts)
    stats = [s.double() for s in stats] if stats else stats
    out = get_method(name).merge(model if pairwise(name) else base_of(name, base), fts, mps, params,
                                 name=NAME, stats=stats)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, model, rtol=1e-12, atol=1e-12)
