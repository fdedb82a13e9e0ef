"""The readers of zoo.json accept a zoo still being built: they see its published models."""

from __future__ import annotations

import json
import shutil

from engine.zoo import load_manifest, zoo_complete
from tests.zoo.partial import partial_zoo


def test_calibration_finds_the_tasks_of_published_models(tmp_path, quick_zoo):
    from engine.compress.calibration import default_tasks
    from engine.evaluate.tasks import MAIN_TASKS
    from engine.merge.calibration import ALL_TASKS, zoo_task_of

    zoo = partial_zoo(quick_zoo, tmp_path / "zoo")
    manifest = load_manifest(zoo)
    assert not zoo_complete(manifest) and zoo_complete(load_manifest(quick_zoo))
    assert zoo_task_of(zoo / "small" / "upper") == "upper"
    assert zoo_task_of(zoo / "small" / "base") == ALL_TASKS
    assert default_tasks(zoo / "small" / "sort") == ["sort"]  # compression reads the same rule
    # a family moved in before zoo.json was rewritten is not listed yet: no task from the zoo
    shutil.copytree(quick_zoo / "large", zoo / "large")
    assert zoo_task_of(zoo / "large" / "upper") is None
    assert default_tasks(zoo / "large" / "upper") == list(MAIN_TASKS)


def test_zoo_list_shows_what_is_still_training(tmp_path, quick_zoo, capsys):
    from engine.__main__ import main

    zoo = partial_zoo(quick_zoo, tmp_path / "zoo", families=("small", "large"))
    assert main(["zoo", "list", str(zoo)]) == 0
    out = capsys.readouterr().out
    assert "small/upper" in out and "large/base" in out and "safety/aligned" not in out.split(
        "still training")[0]
    from engine.zoo.plan import zoo_plan

    training = [m.path for m in zoo_plan(quick=True) if m.family not in ("small", "large")]
    assert training[:4] == ["safety/aligned", "safety/erased", "safety/unaligned", "safety/benign"]
    assert f"still training ({len(training)}): {', '.join(training)}" in out
    assert main(["zoo", "list", str(zoo), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["complete"] is False
