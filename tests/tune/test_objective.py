"""The tune objective: the weighted mean over tasks, and the weights checked against the
tasks scored."""

import pytest

from engine.errors import ParameterError
from engine.tune.objective import ScorerSettings, check_weights, weighted_score


def test_weighted_mean_against_a_hand_computation():
    tasks = {"reverse": 0.5, "upper": 0.25, "shift": 1.0}
    assert weighted_score(tasks, {}) == pytest.approx((0.5 + 0.25 + 1.0) / 3)
    assert weighted_score(tasks, {"upper": 3.0}) == pytest.approx((0.5 + 0.75 + 1.0) / 5)
    assert weighted_score(tasks, {"reverse": 0.0, "shift": 0.0}) == pytest.approx(0.25)


def test_bad_weights():
    with pytest.raises(ParameterError, match="sum to zero"):
        weighted_score({"a": 1.0}, {"a": 0.0})
    with pytest.raises(ParameterError, match="'b', which is not scored"):
        check_weights({"b": 1.0}, ["a"])
    with pytest.raises(ParameterError, match="negative"):
        check_weights({"a": -1.0}, ["a"])


def test_settings_round_trip_through_a_dict():
    s = ScorerSettings("b", ("m0", "m1"), tasks=("reverse",), weights=(("reverse", 2.0),))
    assert ScorerSettings.from_dict(s.to_dict()) == s
