"""engine.merge.registry: the method table, parameter parsing and the uniform merge call."""

import pytest
import torch
from pydantic import BaseModel

from engine.errors import ParameterError
from engine.merge import get_method, list_methods
from engine.merge.registry import METHOD_MODULES
from tests.merge.helpers import family

EXPECTED = {
    "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
    "della", "della_linear", "slerp", "model_stock", "consensus", "tsv", "emr", "fisher", "regmean",
    "channel_merging", "sotu",
}


def test_every_method_is_listed_and_complete():
    assert set(list_methods()) == EXPECTED == set(METHOD_MODULES)
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
