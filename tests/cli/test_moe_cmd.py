"""`python -m engine moe`: a mergekit-moe config file in, a summary line out, progress on
stderr; relative model paths resolve against the config's folder."""

from __future__ import annotations

import json

from engine.__main__ import main
from tests.moe.builders import build_family, moe_config, write_config


def test_moe_command_writes_the_model_and_a_json_summary(tmp_path, capsys):
    family = build_family(tmp_path / "models", experts=2)
    config = moe_config(family)
    # relative to the config file's folder, as mergekit users write them next to their models
    config["base_model"] = "models/base"
    config["experts"][0]["source_model"] = "models/e0"
    path = write_config(tmp_path / "moe.yml", config)
    code = main(["moe", str(path), "--out", str(tmp_path / "out"), "--json"])
    captured = capsys.readouterr()
    assert code == 0
    summary = json.loads(captured.out)
    assert summary["architecture"] == "Mixtral" and summary["experts"] == 2
    assert "100.0%" in captured.err  # progress
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_local_experts"] == 2


def test_moe_command_refuses_a_bad_device_in_one_line(tmp_path, capsys):
    family = build_family(tmp_path / "models", experts=2)
    path = write_config(tmp_path / "moe.yml", moe_config(family, gate_mode="hidden"))
    capsys.readouterr()  # transformers' save progress from building the family
    code = main(["moe", str(path), "--out", str(tmp_path / "out"), "--device", "tpu"])
    err = capsys.readouterr().err
    assert code == 2 and "device" in err and err.strip().count("\n") == 0
    assert not (tmp_path / "out").exists()
