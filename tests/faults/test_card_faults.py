"""Model cards and the LoRA export job under hostile input (issue 11, item 7 and item 3):
folder names and values from the user's files cannot end the card's front matter early or add
keys to it; a card that cannot be made (a late file that clashes, an evaluation that fails)
leaves nothing published; an extract-lora job naming a folder outside the allowed roots or bad
options is refused at submit, nothing queued."""

from __future__ import annotations

import pytest
import torch
import yaml

from engine.errors import ExportError, ParameterError, PathNotAllowedError
from engine.export_card import model_card
from engine.io import ModelWriter
from tests.io.builders import snapshot, staging_leftovers, tiny_tensors, write_model

HOSTILE = "/models/x\n---\nevil: true\n\x1b[2J`|"


def test_hostile_names_and_values_stay_inside_the_front_matter():
    card = model_card(base=HOSTILE, inputs=[HOSTILE, "/m/ok"], method="linear\n---\nevil: 1",
                      parameters={"weight\n---": "1 | 2\n---\nevil: 2"},
                      recipe="merge_method: linear\n---\nevil: 3\n```\n",
                      evaluation={"task\n|x": 0.5})
    head, sep, body = card[4:].partition("\n---\n")
    front = yaml.safe_load(head + "\n")  # the closing line's break ends the last value
    assert sep and set(front) == {"base_model", "library_name", "tags", "delta_workbench"}
    assert front["base_model"] == HOSTILE and front["delta_workbench"]["inputs"][0] == HOSTILE
    assert front["delta_workbench"]["recipe"] == "merge_method: linear\n---\nevil: 3\n```\n"
    assert "\x1b" not in body and "\nevil: 1" not in body and "\nevil: 2" not in body
    # the recipe is shown as it is, inside its code block, which it cannot close early
    assert body.count("```") == 2
    assert "```yaml\nmerge_method: linear\n---\nevil: 3\n'''\n```" in body


def test_a_late_file_that_clashes_or_is_not_bytes_leaves_nothing(tmp_path):
    for late in ({"config.json": b"{}"}, {"README.md": "text"}, {"notes.txt": b"x"}):
        before = snapshot(tmp_path)
        dest = tmp_path / "out"
        extra = {"notes.txt": b"given"}
        with pytest.raises(ExportError) as info:
            with ModelWriter(dest, config={}, extra_files=extra, late_files=lambda _s, f=late: f) as w:
                w.add_tensor("t", torch.ones(2))
        assert "\n" not in str(info.value) and str(dest) in str(info.value)
        assert snapshot(tmp_path) == before and not staging_leftovers(tmp_path)


def test_a_failed_evaluation_publishes_no_merge(tmp_path):
    from engine.merge.executor import run_merge
    from engine.recipe import parse_recipe

    # a model the evaluator cannot build (tensors missing for its config) cannot be scored
    base = write_model(tmp_path / "base", tiny_tensors(seed=0))
    ft = write_model(tmp_path / "ft", tiny_tensors(seed=1))
    recipe = parse_recipe({"merge_method": "task_arithmetic", "base_model": str(base),
                           "models": [{"model": str(ft), "parameters": {"weight": 1.0}}]})
    before = snapshot(tmp_path)
    with pytest.raises(ParameterError) as info:
        run_merge(recipe, tmp_path / "out", device="cpu", evaluate=True)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'out'}: cannot evaluate the merged model: ")
    assert "staging" not in message and "\n" not in message
    assert snapshot(tmp_path) == before and not staging_leftovers(tmp_path)


@pytest.fixture
def roots(monkeypatch, tmp_path):
    monkeypatch.setenv("DELTA_WORKBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DELTA_WORKBENCH_ZOO", str(tmp_path / "zoo"))
    monkeypatch.setenv("DELTA_WORKBENCH_MODEL_ROOTS", str(tmp_path / "models"))
    (tmp_path / "models").mkdir()
    (tmp_path / "outside").mkdir()
    return tmp_path


@pytest.mark.parametrize("where, options, error, needle", [
    ("outside", {}, PathNotAllowedError, "outside"),
    ("models", {"rank": 0}, ValueError, "rank"),
    ("models", {"rank": 4, "evil": 1}, ValueError, "evil"),
])
def test_an_extract_lora_job_is_refused_at_submit(roots, where, options, error, needle):
    from engine.jobs import JobManager, JobSpec

    folder = roots / where
    manager = JobManager(roots / "jobs", max_running=0, gpu=False)
    with pytest.raises(error) as info:
        manager.submit(JobSpec(kind="extract_lora", params={
            "base": str(folder), "finetuned": str(folder), "out": str(roots / "home" / "lora"),
            "options": options}))
    assert needle in str(info.value)
    assert not (roots / "jobs").exists() or not any((roots / "jobs").iterdir())
