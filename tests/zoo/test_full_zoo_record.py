"""The full zoo's accuracy rule, checked on the recorded measurement of the current plan.

Building the full zoo takes about ten minutes, too long for every test run, so the build's
manifest is recorded in ``bench/results/zoo_full.json`` (``python -m engine zoo build --out Z``
then copy ``Z/zoo.json``). These tests hold the record to the current plan (a change of steps,
learning rates, mixtures, widths or tasks without a fresh measurement fails here) and so make
every fresh measurement pass the rule; the rule itself is checked to catch each way a build
can miss it. ``DELTA_WORKBENCH_FULL_ZOO=DIR`` checks a freshly built zoo instead of the record.
"""

from __future__ import annotations

import copy
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


def rule_violations(manifest: dict) -> list[str]:
    """Every way a full zoo build misses the rule: fine-tunes at >= 0.9 on their task and bases
    at <= 0.2 on every task (small and large families), at least four small fine-tunes, 100+
    held-out examples per model, the safety pair's refusal learned then erased, and one
    uninterrupted build within 15 minutes on 2 CPU cores."""
    found = []
    models = manifest["models"]
    for m in models:
        if m["family"] in ("small", "large"):
            if m["role"] == "base" and max(m["accuracy"].values()) > 0.2:
                found.append(f"{m['path']}: a base scores above 0.2")
            if m["role"] == "finetune" and m["accuracy"][m["task"]] < 0.9:
                found.append(f"{m['path']}: below 0.9 on {m['task']}")
        if m["n_eval"] < 100:
            found.append(f"{m['path']}: {m['n_eval']} held-out examples")
    if sum(m["role"] == "finetune" and m["family"] == "small" for m in models) < 4:
        found.append("fewer than four small fine-tunes")
    safety = {m["path"]: m for m in models if m["family"] == "safety"}
    if not {"safety/aligned", "safety/erased"} <= set(safety):
        found.append("no safety pair")
    else:
        aligned, erased = safety["safety/aligned"], safety["safety/erased"]
        if aligned["accuracy"]["refuse"] < 0.9:
            found.append(f"{aligned['path']}: refusal not learned")
        if erased["accuracy"]["refuse"] > 0.2:
            found.append(f"{erased['path']}: refusal not erased")
        if erased["accuracy"][erased["task"]] < 0.9:
            found.append(f"{erased['path']}: below 0.9 on {erased['task']}")
    if manifest["resumed_models"]:
        found.append("a resumed build")
    if manifest["build_seconds"] >= 15 * 60:
        found.append(f"built in {manifest['build_seconds']:.0f} s")
    return found


def test_the_measured_full_zoo_meets_the_rule(full_manifest):
    assert rule_violations(full_manifest) == []


def _model(manifest, path):
    return next(m for m in manifest["models"] if m["path"] == path)


BREAKS = {
    "a fine-tune that did not learn": (lambda z: _model(z, "small/reverse")["accuracy"].update(reverse=0.5),
                                       "small/reverse: below 0.9 on reverse"),
    "a base that already solves a task": (lambda z: _model(z, "large/base")["accuracy"].update(upper=0.5),
                                          "large/base: a base scores above 0.2"),
    "too few examples": (lambda z: _model(z, "small/sort").update(n_eval=24),
                         "small/sort: 24 held-out examples"),
    "too few small fine-tunes": (lambda z: z.update(models=[m for m in z["models"] if not (
        m["family"] == "small" and m["role"] == "finetune" and m["task"] != "reverse")]),
        "fewer than four small fine-tunes"),
    "refusal not erased": (lambda z: _model(z, "safety/erased")["accuracy"].update(refuse=0.6),
                           "safety/erased: refusal not erased"),
    "refusal never learned": (lambda z: _model(z, "safety/aligned")["accuracy"].update(refuse=0.1),
                              "safety/aligned: refusal not learned"),
    "a resumed build": (lambda z: z.update(resumed_models=["small/base"]), "a resumed build"),
    "over the time budget": (lambda z: z.update(build_seconds=1000.0), "built in 1000 s"),
}


@pytest.mark.parametrize("case", list(BREAKS))
def test_the_rule_catches_each_way_a_build_can_miss_it(full_manifest, case):
    broken = copy.deepcopy(full_manifest)
    breaks, expected = BREAKS[case]
    breaks(broken)
    assert expected in rule_violations(broken)
