"""``python -m engine repair``: a JSON summary on stdout, progress on stderr, a loadable model."""

from __future__ import annotations

import json
from pathlib import Path

from engine.__main__ import main


def test_repair_command_writes_and_summarises(quick_zoo, tmp_path, capsys):
    zoo = Path(quick_zoo)
    code = main(["repair", "--method", "irr", "--aligned", str(zoo / "safety/aligned"),
                 "--finetuned", str(zoo / "safety/erased"), "--unaligned", str(zoo / "small/base"),
                 "--param", "safety_vector=alignment_delta", "--param", "keep_conflicting=0.5",
                 "--out", str(tmp_path / "out"), "--json", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0
    summary = json.loads(captured.out)
    assert summary["method"] == "irr" and summary["matrices"] == 14
    assert summary["params"]["keep_conflicting"] == 0.5
    assert "model.layers.1.mlp.down_proj.weight" in captured.err  # progress
    manifest = json.loads((tmp_path / "out/delta_workbench_manifest.json").read_text())
    assert manifest["repair"]["safety_vector"] == "alignment_delta"
    assert manifest["repair"]["data"]["task_examples"] == 128


def test_methods_lists_the_repair_registry(capsys):
    assert main(["methods", "repair", "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in described] == ["safe_delta", "irr", "resta", "random_mask", "delta_scale"]
    safe_delta = described[0]["params_schema"]["properties"]
    assert safe_delta["s"]["default"] == 0.1 and safe_delta["exclude_top"]["default"] == 0.15
    assert safe_delta["budget"]["default"] == "paper"
