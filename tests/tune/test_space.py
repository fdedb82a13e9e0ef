"""The search space of a tune recipe: ranges found where numbers stand, layer groups expanded,
decoded back to a plain recipe; every bad range refused naming its key."""

import pytest

from engine.errors import ParameterError
from engine.recipe import parse_recipe
from engine.tune.space import parse_space


def recipe(**over):
    data = {
        "merge_method": "ties",
        "base_model": "b",
        "parameters": {"lambda": {"range": [0.5, 2.0], "log": True}},
        "models": [
            {"model": "m0", "parameters": {"weight": {"range": [0, 1]}, "density": 0.5}},
            {"model": "m1", "parameters": {"weight": [0.3, {"range": [0, 1]}],
                                           "density": [{"filter": "mlp", "value": {"range": [0.1, 0.9]}},
                                                       {"value": 1.0}]}},
        ],
    }
    data.update(over)
    return data


def test_every_scope_gives_named_dimensions():
    space = parse_space(recipe())
    assert space.names == ["parameters.lambda", "models[0].weight", "models[1].weight[1]",
                           "models[1].density[0]"]
    lam = space.dimensions[0]
    assert (lam.lo, lam.hi, lam.log) == (0.5, 2.0, True)


def test_decode_gives_a_plain_recipe_mergekit_reads():
    space = parse_space(recipe())
    values = {"parameters.lambda": 1.25, "models[0].weight": 0.4, "models[1].weight[1]": 0.8,
              "models[1].density[0]": 0.2}
    plain = space.decode(values)
    assert plain["parameters"]["lambda"] == 1.25
    assert plain["models"][1]["parameters"]["weight"] == [0.3, 0.8]
    assert plain["models"][1]["parameters"]["density"][0] == {"filter": "mlp", "value": 0.2}
    parsed = parse_recipe(plain)
    assert parsed.models[0].parameters["weight"] == 0.4
    assert "range" not in repr(plain)
    # the skeleton is untouched: decoding twice gives independent recipes
    assert space.decode({**values, "models[0].weight": 0.9})["models"][0]["parameters"]["weight"] == 0.9
    assert plain["models"][0]["parameters"]["weight"] == 0.4


def test_layer_groups_expand_per_model_ranges_into_gradients():
    data = recipe(layer_groups=3)
    space = parse_space(data)
    # models[0].weight -> 3 groups; models[1].weight is already a gradient (not expanded);
    # the global lambda is not per model (not expanded)
    assert [n for n in space.names if n.startswith("models[0]")] == [
        "models[0].weight[0]", "models[0].weight[1]", "models[0].weight[2]"]
    assert "parameters.lambda" in space.names
    assert len(space.names) == 1 + 3 + 1 + 1
    plain = space.decode({n: 0.5 for n in space.names})
    assert plain["models"][0]["parameters"]["weight"] == [0.5, 0.5, 0.5]
    assert "layer_groups" not in plain


def test_slices_scopes_are_searched():
    data = {"merge_method": "slerp", "base_model": "a",
            "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]},
                                    {"model": "b", "layer_range": [0, 2]}],
                        "parameters": {"t": {"range": [0, 1]}}}]}
    space = parse_space(data)
    assert space.names == ["slices[0].t"]
    assert space.decode({"slices[0].t": 0.25})["slices"][0]["parameters"]["t"] == 0.25


@pytest.mark.parametrize("bad, message", [
    ({"range": [1, 1]}, "needs lo < hi"),
    ({"range": [2, 1]}, "needs lo < hi"),
    ({"range": [0, 1], "log": True}, "log range needs lo > 0"),
    ({"range": [0]}, "two numbers"),
    ({"range": ["a", 1]}, "two numbers"),
    ({"range": [0, 1], "step": 2}, "'range' and 'log' only"),
])
def test_bad_ranges_are_refused_naming_the_key(bad, message):
    data = recipe()
    data["models"][0]["parameters"]["weight"] = bad
    with pytest.raises(ParameterError, match=message) as err:
        parse_space(data)
    assert "models[0].parameters.weight" in str(err.value)


def test_range_on_a_non_numeric_parameter_is_refused():
    data = recipe()
    data["parameters"]["normalize"] = {"range": [0, 1]}
    with pytest.raises(ParameterError, match="parameters.normalize: a range needs a numeric parameter"):
        parse_space(data)


def test_a_recipe_without_ranges_is_refused():
    data = recipe()
    data["parameters"] = {}
    data["models"] = [{"model": "m0", "parameters": {"weight": 1.0}}]
    with pytest.raises(ParameterError, match="no {range"):
        parse_space(data)


def test_bad_layer_groups():
    with pytest.raises(ParameterError, match="layer_groups"):
        parse_space(recipe(layer_groups=0))


def test_a_recipe_without_ranges_is_an_empty_space_when_allowed():
    data = recipe()
    data["parameters"] = {}
    data["models"] = [{"model": "m0", "parameters": {"weight": 1.0}}]
    space = parse_space(data, require=False)
    assert space.names == [] and space.decode({}) == data
