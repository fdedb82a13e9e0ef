"""``merge --timings PATH``: seconds per stage of the streaming merge, as JSON."""

from __future__ import annotations

import json

from engine.__main__ import main
from engine.io.names import MANIFEST_NAME


def test_timings_file_has_every_stage_and_matches_the_manifest(tmp_path, capsys):
    from tests.compress.helpers import make_pair

    base, ft, _, _ = make_pair(tmp_path / "pair")
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\n"
                      f"models:\n  - model: {ft}\n    parameters: {{weight: 0.5}}\n")
    timings = tmp_path / "timings.json"
    code = main(["merge", str(recipe), "--out", str(tmp_path / "merged"), "--quiet", "--device", "cpu",
                 "--timings", str(timings)])
    assert code == 0, capsys.readouterr().err
    report = json.loads(timings.read_text())
    seconds = report["seconds"]
    assert report["method"] == "task_arithmetic" and report["tensors"] > 0
    assert {"wall", "read", "merge", "write", "verify", "hash", "fsync", "finalize"} <= set(seconds)
    assert set(seconds["cpu"]) <= set(seconds) and all(v >= 0 for v in seconds["cpu"].values())
    # the stages that ran on the merge thread fit inside the wall time
    assert seconds["merge"] + seconds["wait_read"] + seconds["wait_write"] <= seconds["wall"]
    manifest = json.loads((tmp_path / "merged" / MANIFEST_NAME).read_text())
    assert set(manifest["timings"]) <= set(seconds)
