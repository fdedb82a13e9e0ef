"""A zoo folder a build cannot continue: a partial zoo.json with bad complete/pending fields,
a published model trained with another plan, a partial zoo started with other settings. Each
is a one-line named error, and the zoo is left exactly as it was (no staging folder either)."""

from __future__ import annotations

import json

import pytest

from engine.errors import ConfigError, ExportError
from engine.zoo import build_zoo, load_manifest
from tests.faults.refusal import assert_refused
from tests.zoo.partial import partial_zoo


@pytest.fixture(autouse=True)
def _own_home(monkeypatch, tmp_path_factory):
    """The staging registry of the refused builds lives outside the snapshotted folder."""
    monkeypatch.setenv("DELTA_WORKBENCH_HOME", str(tmp_path_factory.mktemp("home")))


@pytest.mark.parametrize("field", [{"complete": "no"}, {"pending": "large/base"},
                                   {"pending": [1]}, {"complete": None}])
def test_a_bad_complete_or_pending_field_is_a_named_error(tmp_path, quick_zoo, field):
    zoo = partial_zoo(quick_zoo, tmp_path / "zoo")
    manifest = json.loads((zoo / "zoo.json").read_text())
    (zoo / "zoo.json").write_text(json.dumps({**manifest, **field}))
    assert_refused(tmp_path, lambda: load_manifest(zoo), ConfigError, "complete/pending", "zoo.json")
    assert_refused(tmp_path, lambda: build_zoo(zoo, quick=True, resume=True), ConfigError,
             "complete/pending")


def test_a_published_model_of_another_plan_is_refused_naming_it(tmp_path, quick_zoo):
    zoo = partial_zoo(quick_zoo, tmp_path / "zoo")
    stored = zoo / "small" / "upper" / "delta_workbench_manifest.json"
    record = json.loads(stored.read_text())
    record["zoo"]["steps"] += 1
    stored.write_text(json.dumps(record))
    assert_refused(tmp_path, lambda: build_zoo(zoo, quick=True, seed=0, resume=True), ExportError,
             "small/upper", "another plan")


def test_a_partial_zoo_of_other_settings_isassert_refused(tmp_path, quick_zoo):
    zoo = partial_zoo(quick_zoo, tmp_path / "zoo")
    assert_refused(tmp_path, lambda: build_zoo(zoo, quick=False, seed=0, resume=True), ExportError,
             "quick=True", "same settings")
    assert_refused(tmp_path, lambda: build_zoo(zoo, quick=True, seed=3, resume=True), ExportError,
             "seed=0", "same settings")
    assert_refused(tmp_path, lambda: build_zoo(zoo, quick=True, seed=0), ExportError,
             "unfinished build", "--resume")


def test_a_non_empty_folder_without_a_zoo_is_refused_even_on_resume(tmp_path):
    (tmp_path / "zoo").mkdir()
    (tmp_path / "zoo" / "notes.txt").write_text("mine")
    assert_refused(tmp_path, lambda: build_zoo(tmp_path / "zoo", quick=True, resume=True),
             ExportError, "not empty")
