"""The full zoo's accuracy rule, checked on the recorded measurement of the current plan.

Building the full zoo takes about ten minutes, too long for every test run, so the build's
manifest is recorded in ``bench/results/zoo_full.json`` (``python -m engine zoo build --out Z``
then copy ``Z/zoo.json``). These tests hold the record to the rule AND to the current plan: a
change of steps, learning rates, mixtures, widths or tasks without a fresh measurement fails
here. ``DELTA_WORKBENCH_FULL_ZOO=DIR`` checks a freshly built zoo instead of the record.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from engine.zoo.plan import FULL_ARCHS, zoo_plan

RECORD = Path(__file__).resolve().parents[2] / "bench" / "results" / "zoo_full.json"


@pytest.fixture(scope="module")
def full_manifest() -> dict:
    folder = os.environ.get("DELTA_WORKBENCH_FULL_ZOO")
    path = Path(folder) / "zoo.json" if folder else RECORD
    return json.loads(path.read_text())


def test_record_is_of_the_current_plan(full_manifest):
    assert full_manifest["quick"] is False and full_manifest["seed"] == 0
    recorded = {m["path"]: m for m in full_manifest["models"]}
    plan = zoo_plan(quick=False)
    assert list(recorded) == [p.path for p in plan]
    for item in plan:
        entry, arch = recorded[item.path], FULL_ARCHS[item.arch]
        assert entry["steps"] == item.spec.steps and entry["lr"] == item.spec.lr, item.path
        assert entry["batch_size"] == item.spec.batch_size and entry["parent"] == item.parent
        assert entry["trained_on"] == item.spec.mixture and entry["task"] == item.task
        assert entry["arch"]["hidden_size"] == arch.hidden_size
        assert entry["arch"]["num_hidden_layers"] == arch.num_hidden_layers


def test_finetunes_score_at_least_0_9_and_bases_at_most_0_2(full_manifest):
    models = full_manifest["models"]
    for m in models:
        if m["role"] == "base" and m["family"] in ("small", "large"):
            assert max(m["accuracy"].values()) <= 0.2, m["path"]
        if m["role"] == "finetune" and m["family"] in ("small", "large"):
            assert m["accuracy"][m["task"]] >= 0.9, (m["path"], m["accuracy"])
    assert sum(m["role"] == "finetune" and m["family"] == "small" for m in models) >= 4
    assert all(m["n_eval"] >= 100 for m in models)


def test_safety_pair_refusal_is_erased(full_manifest):
    safety = {m["role"]: m for m in full_manifest["models"] if m["family"] == "safety"}
    aligned, erased = safety["base"], safety["finetune"]
    assert aligned["accuracy"]["refuse"] >= 0.9
    assert erased["accuracy"]["refuse"] <= 0.2
    assert erased["accuracy"][erased["task"]] >= 0.9


def test_full_build_fits_its_time_budget(full_manifest):
    """The rule is 15 minutes on 2 CPU cores; the record must be an uninterrupted build."""
    assert full_manifest["resumed_models"] == []
    assert full_manifest["build_seconds"] < 15 * 60
