"""engine.merge.registry: the method table, parameter parsing and the uniform merge call."""

import pytest
import torch
from pydantic import BaseModel

from engine.errors import ParameterError
from engine.merge import chunked, get_method, list_methods, registry
from engine.merge.gta import Variant
from engine.merge.methods import task_arithmetic_family
from engine.merge.registry import FAMILY_MODULES, METHOD_MODULES
from tests.merge.helpers import family

EXPECTED = {
    "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
    "della", "della_linear", "slerp", "model_stock", "consensus", "tsv", "emr", "fisher", "regmean",
    "channel_merging", "sotu", "nuslerp", "multislerp", "karcher", "sce", "arcee_fusion", "nearswap", "ram",
    "ramplus_tl", "passthrough",
}


def test_every_method_is_listed_and_complete():
    declared = [v.name for v in task_arithmetic_family.VARIANTS]
    one_file = [m for m in METHOD_MODULES if m not in FAMILY_MODULES]
    assert set(list_methods()) == EXPECTED == set(one_file) | set(declared)
    assert len(list_methods()) == len(one_file) + len(declared)  # nothing listed twice
    for name in list_methods():
        m = get_method(name)
        assert m.name == name and m.paper
        assert issubclass(m.params_class, BaseModel) and issubclass(m.model_params_class, BaseModel)
        assert callable(m.module.merge_tensor)
        desc = m.describe()
        assert desc["params_schema"]["type"] == "object"
        assert desc["model_params_schema"]["type"] == "object"


def test_unknown_method_names_the_known_ones():
    with pytest.raises(ParameterError, match="unknown merge method 'tiez'.*ties"):
        get_method("tiez")


# mergekit/merge_methods/registry.py: (normalize, rescale) per task-vector method
MERGEKIT_DEFAULTS = {
    "task_arithmetic": (False, False),
    "ties": (True, False),
    "dare_ties": (False, True),
    "dare_linear": (False, True),
    "breadcrumbs": (False, False),
    "breadcrumbs_ties": (False, False),
    "della": (True, True),
    "della_linear": (False, True),
}


@pytest.mark.parametrize("name", sorted(MERGEKIT_DEFAULTS))
def test_mergekit_defaults(name):
    m = get_method(name)
    p = m.parse_params({})
    assert (p.normalize, p.rescale) == MERGEKIT_DEFAULTS[name]
    assert p.lambda_ == 1.0 and p.int8_mask is False
    assert p.model_dump(by_alias=True)["lambda"] == 1.0
    fields = m.model_params_class.model_fields
    assert fields["weight"].is_required()  # mergekit: weight required
    if name != "task_arithmetic":
        assert fields["density"].default == 1.0
    if name.startswith("breadcrumbs"):
        assert fields["gamma"].default == 0.01
    if name.startswith("della"):
        assert fields["epsilon"].default == 0.15


def test_other_mergekit_defaults():
    assert get_method("linear").parse_params({}).normalize is True
    assert get_method("linear").model_params_class.model_fields["weight"].is_required()
    assert get_method("model_stock").parse_params({}).filter_wise is False
    with pytest.raises(ParameterError, match="t: Field required"):
        get_method("slerp").parse_params({})  # mergekit: t required


def test_parse_params_accepts_mergekit_alias_and_errors_name_the_field():
    m = get_method("ties")
    assert m.parse_params({"lambda": 0.5}).lambda_ == 0.5
    with pytest.raises(ParameterError, match=r"ties parameters: lambda: Input should be a finite number"):
        m.parse_params({"lambda": float("nan")})
    with pytest.raises(ParameterError, match=r"normalise: Extra inputs are not permitted"):
        m.parse_params({"normalise": True})
    with pytest.raises(ParameterError, match=r"ties model 1 parameters: density: Input should be greater than 0"):
        m.parse_model_params([{"weight": 1, "density": 0.5}, {"weight": 1, "density": 0}])


def test_merge_wrapper_parses_raw_dicts():
    base, fts = family(2)
    out = get_method("task_arithmetic").merge(base, fts, [{"weight": 0.5}, {"weight": 0.5}], {"lambda": 2.0})
    expected = base + 2.0 * 0.5 * ((fts[0] - base) + (fts[1] - base))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_stats_only_for_methods_that_take_them():
    base, fts = family(2)
    with pytest.raises(ParameterError, match="takes no calibration statistics"):
        get_method("linear").merge(None, fts, [{"weight": 1}] * 2, stats=[base, base])
    assert get_method("fisher").stats == "fisher" and get_method("regmean").stats == "gram"


# ---------------------------------------------------------------- the family as data
@pytest.fixture
def magnitude_linear(monkeypatch):
    """A ninth task-arithmetic variant, added as one declaration: TIES' magnitude trim without
    the sign election, normalised (what the registry, the recipes and the chunked path see)."""
    variant = Variant("magnitude_linear", "a test declaration", sparsification="magnitude",
                      consensus=False, normalize=True, rescale=False)
    monkeypatch.setattr(task_arithmetic_family, "VARIANTS", (*task_arithmetic_family.VARIANTS, variant))
    monkeypatch.setattr(registry, "_TABLE", registry.build_table())
    return variant


def _magnitude_linear_reference(base, fts, mps):
    """float64, by hand: keep each task vector's int(density * n) largest |delta|, weighted
    mean of the kept deltas, plus the base."""
    base64, acc = base.double(), torch.zeros(base.shape, dtype=torch.float64)
    for ft, mp in zip(fts, mps):
        delta = (ft.double() - base64).reshape(-1)
        k = max(1, int(mp["density"] * delta.numel()))
        kept = torch.zeros_like(delta)
        top = delta.abs().argsort(descending=True)[:k]
        kept[top] = delta[top]
        acc += mp["weight"] * kept.reshape(base.shape)
    return base64 + acc / sum(mp["weight"] for mp in mps)


def test_a_new_variant_is_one_declaration_and_merges(magnitude_linear, tmp_path):
    from engine.io import ModelFolder
    from engine.merge.executor import run_merge
    from engine.recipe import parse_recipe
    from tests.io.builders import write_model

    assert list_methods()[-1] == "sotu" and "magnitude_linear" in list_methods()
    m = get_method("magnitude_linear")
    assert m.module is magnitude_linear and m.requires_base and not m.randomized
    assert set(m.model_params_class.model_fields) == {"weight", "density"}
    assert m.parse_params({}).normalize is True and "consensus_method" not in m.params_class.model_fields
    assert m.describe()["params_schema"]["title"] == "Params"

    base, fts = family(n=3, shape=(20, 15))
    mps = [{"weight": 0.6, "density": 0.4}, {"weight": 0.3, "density": 0.7}, {"weight": 0.5, "density": 1.0}]
    expected = _magnitude_linear_reference(base, fts, mps)
    got = m.merge(base, fts, mps)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
    # the chunked CPU path reads the same declaration: same bits
    p, parsed = m.parse_params({}), m.parse_model_params(mps)
    assert chunked.supports(m, p)
    out = torch.empty(base.shape)
    chunked.merge_into(m, base, fts, parsed, p, out)
    assert torch.equal(out, got)

    # and a recipe names it like any other method
    folders = [write_model(tmp_path / name, {"model.layers.0.mlp.up_proj.weight": t})
               for name, t in zip(["base", "a", "b", "c"], [base, *fts])]
    recipe = parse_recipe({"merge_method": "magnitude_linear", "base_model": str(folders[0]),
                           "models": [{"model": str(f), "parameters": mp} for f, mp in zip(folders[1:], mps)]})
    with ModelFolder(run_merge(recipe, tmp_path / "out", device="cpu").out) as merged:
        torch.testing.assert_close(merged.read_tensor("model.layers.0.mlp.up_proj.weight").double(),
                                   expected, rtol=1e-6, atol=1e-6)


def test_a_declaration_with_an_unknown_sparsification_is_refused():
    with pytest.raises(TypeError, match="unknown sparsification 'topk'"):
        Variant("x", "p", sparsification="topk", consensus=False, normalize=False, rescale=False)


def test_a_method_declares_what_a_form_needs_so_pages_name_no_method():
    """slerp takes one fine-tune, linear starts from the plain mean; the merge lab reads these
    declarations (pages/merge_lab.py names no method)."""
    from pathlib import Path

    slerp, linear, ties = get_method("slerp"), get_method("linear"), get_method("ties")
    assert slerp.max_models == 1 and linear.max_models is None and ties.max_models is None
    assert linear.starting_weight(4) == pytest.approx(0.25) and linear.starting_weight(0) == 1.0
    assert ties.starting_weight(4) == 1.0 and slerp.starting_weight(3) == 1.0
    assert slerp.describe()["max_models"] == 1 and linear.describe()["default_weight"] == "share"
    page = (Path(__file__).resolve().parents[2] / "pages" / "merge_lab.py").read_text()
    for name in ("slerp", "linear", "ties"):
        assert f'"{name}"' not in page, name
    assert registry.default_method() == "ties"
