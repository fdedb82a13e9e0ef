"""Parameters that would produce NaN or nonsense are refused with a message naming the field."""

import pytest
import torch

from engine.errors import ParameterError
from engine.merge import get_method
from tests.merge.helpers import family

BAD = [
    ("linear", {}, [{"weight": 1.0}, {"weight": -1.0}], "weights sum to 0"),
    ("task_arithmetic", {"normalize": True}, [{"weight": 0.5}, {"weight": -0.5}], "weights sum to 0"),
    ("ties", {}, [{"weight": 0.0}, {"weight": 0.0}], "weights sum to 0"),
    ("linear", {}, [{"weight": 1.0}, {}], "weight: Field required"),
    ("ties", {}, [{"weight": 1, "density": 0.0}] * 2, "density: Input should be greater than 0"),
    ("ties", {}, [{"weight": 1, "density": 1.5}] * 2, "density: Input should be less than or equal to 1"),
    ("dare_ties", {}, [{"weight": 1, "density": float("nan")}] * 2, "density: Input should be a finite number"),
    ("breadcrumbs", {}, [{"weight": 1, "density": 0.5, "gamma": 1.0}] * 2, "gamma: Input should be less than 1"),
    ("della", {}, [{"weight": 1, "density": 0.1, "epsilon": 0.15}] * 2, "density 0.1 \\+/- epsilon 0.15"),
    ("della_linear", {}, [{"weight": 1, "density": 0.9, "epsilon": 0.15}] * 2, "must stay inside"),
    ("ties", {"lambda": float("inf")}, [{"weight": 1}] * 2, "lambda: Input should be a finite number"),
    ("ties", {"consensus_method": "vote"}, [{"weight": 1}] * 2, "consensus_method"),
    ("ties", {"densty": 0.5}, [{"weight": 1}] * 2, "densty: Extra inputs are not permitted"),
    ("dare_linear", {"rescale_norm": "l2"}, [{"weight": 1}] * 2, "rescale_norm"),
    ("slerp", {"t": 1.5}, [{}], "t: Input should be less than or equal to 1"),
    ("slerp", {}, [{}], "t: Field required"),
    ("consensus", {"k": -1}, [{}] * 2, "k: Input should be greater than or equal to 0"),
    ("consensus", {}, [{"tall_mask_lambda": 0}] * 2, "tall_mask_lambda"),
    ("tsv", {"keep_fraction": 0}, [{}] * 2, "keep_fraction"),
    ("emr", {"task": 2}, [{}] * 2, "task 2 out of range"),
    ("fisher", {}, [{"weight": 0}] * 2, "at least one weight must be positive"),
    ("fisher", {"fisher_floor": 0}, [{}] * 2, "fisher_floor"),
    ("regmean", {"alpha": 1.2}, [{}] * 2, "alpha"),
    ("regmean", {}, [{"weight": -1}, {}], "weight: Input should be greater than or equal to 0"),
    ("channel_merging", {"num_groups": 0}, [{}] * 2, "num_groups"),
    ("channel_merging", {}, [{"weight": 0}] * 2, "weight: Input should be greater than 0"),
    ("sotu", {"disjoint": True}, [{"density": 0.6}] * 2, "densities summing to at most 1"),
    ("sotu", {}, [{"density": 0.1, "seed": -3}] * 2, "seed: Input should be greater than or equal to 0"),
    ("model_stock", {}, [{}], "at least 2"),
    ("slerp", {"t": 0.5}, [{}, {}], "at most 1"),
]


@pytest.mark.parametrize("name, params, mps, match", BAD, ids=[f"{b[0]}-{b[3][:30]}" for b in BAD])
def test_bad_parameters_are_rejected(name, params, mps, match):
    base, fts = family(n=len(mps))
    stats = [torch.ones_like(base)] * len(mps) if name == "fisher" else None
    with pytest.raises(ParameterError, match=match):
        get_method(name).merge(base, fts, mps, params, stats=stats)


def test_validate_hook_checks_before_any_tensor_work():
    m = get_method("linear")
    with pytest.raises(ParameterError, match="weights sum to 0"):
        m.validate(m.parse_params({}), m.parse_model_params([{"weight": 2}, {"weight": -2}]))
    m.validate(m.parse_params({"normalize": False}), m.parse_model_params([{"weight": 2}, {"weight": -2}]))
