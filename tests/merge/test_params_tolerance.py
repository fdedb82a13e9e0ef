"""Recipe parameters that do not apply are ignored with a warning (as mergekit ignores them);
unknown keys are refused naming the key and the method; scopes follow mergekit."""

from __future__ import annotations

import warnings

import pytest
import torch

from engine.errors import ParameterError
from engine.merge.spec import MERGEKIT_PARAMETER_NAMES, IgnoredParameterWarning, MergeSpec, known_parameter_names
from tests.merge.helpers import family


def build(method, global_scopes, model_scopes, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec = MergeSpec.build(method, global_scopes, model_scopes, **kw)
    assert [str(w.message) for w in caught if w.category is IgnoredParameterWarning] == spec.warnings
    return spec


@pytest.mark.parametrize("method, global_scope, model_scope, ignored", [
    ("linear", {"int8_mask": True, "lambda": 0.5}, {"weight": 1.0, "density": 0.3}, {"int8_mask", "lambda", "density"}),
    ("slerp", {"t": 0.3, "normalize": True, "rescale": False}, {"weight": 1.0}, {"normalize", "rescale", "weight"}),
    ("model_stock", {"filter_wise": False, "int8_mask": True}, {"weight": 0.5}, {"int8_mask", "weight"}),
    ("task_arithmetic", {"gamma": 0.1, "t": 0.5}, {"weight": 1.0, "epsilon": 0.1}, {"gamma", "t", "epsilon"}),
    ("ties", {"tall_mask_lambda": 0.4}, {"weight": 1.0, "lambda": 0.5, "normalize": False}, {"tall_mask_lambda", "lambda", "normalize"}),
    ("fisher", {"calibration": {"n": 4}, "int8_mask": True}, {"calibration_task": "upper"}, {"int8_mask"}),
    ("linear", {"calibration": {"n": 4}}, {"weight": 1.0, "calibration_task": "upper"}, {"calibration", "calibration_task"}),
])
def test_inapplicable_parameters_are_ignored_with_a_warning(method, global_scope, model_scope, ignored):
    n = 1 if method == "slerp" else 2
    spec = build(method, [global_scope], [dict(model_scope) for _ in range(n)])
    assert {w.split("'")[1] for w in spec.warnings} == ignored
    spec.check(["model.layers.0.mlp.up_proj.weight", "model.norm.weight"])  # validates
    # the ignored keys change nothing
    kept_global = {k: v for k, v in global_scope.items() if k not in ignored}
    kept_model = {k: v for k, v in model_scope.items() if k not in ignored}
    clean = MergeSpec.build(method, [kept_global], [dict(kept_model) for _ in range(n)])
    name = "model.layers.0.mlp.up_proj.weight"
    assert spec.tensor_params(name) == clean.tensor_params(name)
    if method not in ("fisher",):
        base, fts = family(n=n)
        torch.testing.assert_close(spec.merge_tensor(name, base, fts), clean.merge_tensor(name, base, fts))


def test_per_model_global_parameter_is_explained():
    spec = build("ties", [{}], [{"weight": 1.0, "normalize": False}])
    assert "global parameter set per model" in spec.warnings[0]
    assert spec.tensor_params("x")[0].normalize is True  # ties' default stands


@pytest.mark.parametrize("method, global_scope, model_scope, key, where", [
    ("ties", {}, {"wieght": 1.0}, "wieght", "model 0"),
    ("ties", {"densty": 0.5}, {"weight": 1.0}, "densty", "recipe's parameters"),
    ("linear", {"normalise": True}, {"weight": 1.0}, "normalise", "recipe's parameters"),
    ("slerp", {"t": 0.5, "tt": 0.5}, {}, "tt", "recipe's parameters"),
])
def test_unknown_keys_are_refused_naming_key_and_method(method, global_scope, model_scope, key, where):
    with pytest.raises(ParameterError) as err:
        MergeSpec.build(method, [global_scope], [model_scope])
    message = str(err.value)
    assert f"'{key}'" in message and f"'{method}'" in message and where in message
    assert "takes:" in message


def test_known_names_cover_mergekit_and_ours():
    names = known_parameter_names()
    assert MERGEKIT_PARAMETER_NAMES <= names
    assert {"tall_mask_lambda", "fisher_floor", "num_groups", "calibration", "calibration_task", "lambda"} <= names
    assert "lambda_" in names  # our field name of mergekit's 'lambda'


def test_scopes_model_over_slice_over_recipe_with_filter_fallthrough():
    # recipe: weight 0.1 everywhere; slice: weight 0.2 on mlp only; model 1: weight 0.9 on attention
    spec = build("task_arithmetic",
                 [{"weight": 0.1, "lambda": 2.0}, {"weight": [{"filter": "mlp", "value": 0.2}], "lambda": 0.5}],
                 [{}, {"weight": [{"filter": "self_attn", "value": 0.9}]}])
    params, mps = spec.tensor_params("model.layers.0.mlp.up_proj.weight")
    assert params.lambda_ == 0.5 and [m.weight for m in mps] == [0.2, 0.2]
    params, mps = spec.tensor_params("model.layers.0.self_attn.q_proj.weight")
    assert [m.weight for m in mps] == [0.1, 0.9]
    _, mps = spec.tensor_params("model.norm.weight")
    assert [m.weight for m in mps] == [0.1, 0.1]


def test_slice_level_parameters_are_global_in_a_recipe(tmp_path):
    from engine.recipe import parse_recipe

    recipe = parse_recipe({"merge_method": "slerp", "base_model": "a",
                           "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]},
                                                   {"model": "b", "layer_range": [0, 2]}],
                                       "parameters": {"t": [0.0, 1.0]}}]})
    assert recipe.parameter_scopes() == [{}, {"t": [0.0, 1.0]}]
    assert [m.parameters for m in recipe.input_models()] == [{}, {}]
    spec = MergeSpec.build("slerp", recipe.parameter_scopes(), [{}], num_layers=2)
    assert spec.tensor_params("model.layers.1.mlp.up_proj.weight")[0].t == 1.0
    assert spec.warnings == []
