"""engine.merge.params: mergekit-style scalars, gradients and filters resolved per tensor."""

import pytest

from engine.errors import ParameterError
from engine.merge.params import layer_fraction, resolve, resolve_all

SLERP_T = [
    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
    {"value": 0.5},
]


def test_layer_fraction_follows_mergekit_plan():
    assert layer_fraction(None, 32) == 0.0  # embeddings, final norm, lm_head
    assert layer_fraction(0, 32) == 0.0
    assert layer_fraction(31, 32) == 1.0
    assert layer_fraction(10, 32) == pytest.approx(10 / 31)
    assert layer_fraction(0, 1) == 1.0  # a one-layer slice gets t = 1
    with pytest.raises(ParameterError):
        layer_fraction(32, 32)
    with pytest.raises(ParameterError):
        layer_fraction(3, None)


def test_scalars_pass_through():
    assert resolve(0.3, "model.layers.1.mlp.up_proj.weight", 1, 4) == 0.3
    assert resolve(True, "x") is True
    assert resolve("sum", "x") == "sum"
    assert resolve(None, "x", default=7) == 7


def test_gradient_interpolation_hand_computed():
    grad = [0, 0.5, 0.3, 0.7, 1]
    # layer 10 of 32: t = 10/31, x = 4t = 40/31, between anchors 1 and 2 at fraction 9/31
    expected = (22 / 31) * 0.5 + (9 / 31) * 0.3
    assert resolve(grad, "model.layers.10.self_attn.q_proj.weight", 10, 32) == pytest.approx(expected)
    assert expected == pytest.approx(0.441935, abs=1e-6)
    assert resolve(grad, "model.layers.31.mlp.up_proj.weight", 31, 32) == pytest.approx(1.0)
    assert resolve(grad, "model.layers.0.mlp.up_proj.weight", 0, 32) == 0
    assert resolve([0, 1], "model.layers.3.mlp.up_proj.weight", 3, 5) == pytest.approx(0.75)
    assert resolve([2.0], "model.layers.3.mlp.up_proj.weight", 3, 5) == 2.0
    # outside the layer stack t = 0: the first anchor
    assert resolve(grad, "model.embed_tokens.weight") == 0
    # exactly on an anchor: layer 8 of 9 -> t = 1; layer 2 of 9 -> x = 1.0
    assert resolve(grad, "model.layers.2.mlp.up_proj.weight", 2, 9) == pytest.approx(0.5)


def test_non_numeric_gradient_picks_an_entry():
    assert resolve([True, False, False], "model.layers.2.x", 2, 5) is False  # int(0.5 * 2) = 1
    assert resolve(["a", "b"], "model.layers.0.x", 0, 5) == "a"
    assert resolve(["a", "b"], "model.layers.4.x", 4, 5) == "b"


def test_filters_first_match_and_fallback():
    attn = "model.layers.3.self_attn.q_proj.weight"
    mlp = "model.layers.1.mlp.down_proj.weight"
    assert resolve(SLERP_T, attn, 3, 4) == pytest.approx(1.0)
    # layer 1 of 5: t = 0.25, x = 1.0 -> anchor 1 of the mlp gradient
    assert resolve(SLERP_T, mlp, 1, 5) == pytest.approx(0.5)
    # layer 1 of 4: t = 1/3, x = 4/3 -> (2/3) 0.5 + (1/3) 0.7
    assert resolve(SLERP_T, mlp, 1, 4) == pytest.approx((2 / 3) * 0.5 + (1 / 3) * 0.7)
    assert resolve(SLERP_T, "model.norm.weight") == 0.5
    assert resolve([{"filter": "layers", "value": 1}, {"filter": "mlp", "value": 2}], mlp, 1, 4) == 1
    assert resolve([{"filter": "*", "value": 9}], "anything") == 9
    assert resolve({"filter": "mlp", "value": 3}, mlp, 1, 4) == 3  # a single condition
    assert resolve([{"filter": "mlp", "value": 2}], attn, 3, 4) is None
    assert resolve([{"filter": "mlp", "value": 2}], attn, 3, 4, default=0.1) == 0.1


def test_object_conditions_like_mergekit_conditional_parameter():
    class Cond:
        def __init__(self, filter, value):
            self.filter, self.value = filter, value

    assert resolve([Cond("mlp", [0, 1]), Cond(None, 5)], "model.layers.2.mlp.x", 2, 3) == pytest.approx(1.0)
    assert resolve([Cond("mlp", [0, 1]), Cond(None, 5)], "model.layers.2.attn.x", 2, 3) == 5


def test_resolve_all_leaves_unmatched_out():
    settings = {"t": SLERP_T, "density": [{"filter": "mlp", "value": 0.4}], "weight": 1.0}
    assert resolve_all(settings, "model.layers.0.self_attn.o_proj.weight", 0, 2) == {"t": 0, "weight": 1.0}
    assert resolve_all(settings, "model.layers.1.mlp.up_proj.weight", 1, 2) == {"t": 0, "density": 0.4, "weight": 1.0}
    assert resolve_all(None, "x") == {}


@pytest.mark.parametrize(
    "bad, match",
    [
        ([], "at least one value"),
        ([{"filter": "mlp"}], "needs 'value'"),
        ([{"filter": "mlp", "value": 1, "extra": 2}], "needs 'value'"),
        ([{"filter": "mlp", "value": 1}, 0.5], "mixes conditions"),
        ([{"value": [{"filter": "mlp", "value": 1}]}], "not another condition"),
        ([0.1, float("inf")], "not finite"),
        ([0.1, [0.2]], "gradient holds numbers"),
        (object(), "unexpected setting"),
    ],
)
def test_bad_settings_raise_parameter_error(bad, match):
    with pytest.raises(ParameterError, match=match):
        resolve(bad, "model.layers.1.mlp.up_proj.weight", 1, 4)
