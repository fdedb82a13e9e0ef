"""``transfer`` end to end on the quick zoo (tiny budgets): a model of the target's shape that
loads in transformers, with its manifest and card; every refusal as one line, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.__main__ import main
from engine.transfer.run import transfer

TINY = {"postpkt": {"n_seed": 4, "n_train": 32, "epochs": 1, "batch_size": 16, "rank": 4,
                    "curve_steps": [0, 2]},
        "laten": {"n_extract": 2, "n_align": 4, "align_per_step": 2, "checkpoint": 2}}


def _paths(zoo):
    zoo = Path(zoo)
    return str(zoo / "large/reverse"), str(zoo / "large/base"), str(zoo / "small/base")


@pytest.mark.parametrize("method", ["postpkt", "laten_control"])
def test_transfer_writes_a_model_of_the_targets_shape(quick_zoo, tmp_path, method):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    source, base, target = _paths(quick_zoo)
    out = tmp_path / "out"
    seen = []
    result = transfer(source, base, target, out, method, "reverse", TINY[method.split("_")[0]],
                      n_eval=8, progress=lambda f, m: seen.append(f))
    assert seen and seen[-1] == 1.0
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)
    assert model.config.hidden_size == json.loads((Path(target) / "config.json").read_text())["hidden_size"]
    written, original = load_file(out / "model.safetensors"), load_file(Path(target) / "model.safetensors")
    assert set(written) == set(original)
    assert all(written[n].shape == original[n].shape for n in original)
    changed = [n for n in original if not torch.equal(written[n], original[n])]
    assert changed  # the transfer changed the target
    manifest = json.loads((out / "delta_workbench_manifest.json").read_text())["transfer"]
    assert manifest["method"] == method and manifest["task"] == "reverse"
    assert set(manifest["accuracy"]) == {"target_base", "transferred"}
    assert "transfer" in (out / "README.md").read_text()
    if method == "postpkt":
        # the PiSSA-style start equals the target: step 0 scores as the target base does
        assert result.curve[0] == {"step": 0, "accuracy": result.accuracy["target_base"]}
        assert [c["step"] for c in result.curve] == [0, 2]
        cos = manifest["report"]["lora_cosines"]["model.layers.0.mlp.up_proj"]
        assert -1 <= cos["vs_original"] <= 1 and cos["pissa_vs_original"] > 0
        assert manifest["report"]["teacher_layers"] == sorted(manifest["report"]["teacher_layers"])
    else:  # only the located rows/columns of up, down, v, o change
        assert all(any(k in n for k in ("up_proj", "down_proj", "v_proj", "o_proj")) for n in changed)


def test_baselines_score_the_control_and_a_plain_finetune(quick_zoo, tmp_path):
    source, base, target = _paths(quick_zoo)
    result = transfer(source, base, target, tmp_path / "o", "laten", "upper", TINY["laten"],
                      n_eval=4, baselines=True)
    assert set(result.accuracy) == {"target_base", "transferred", "control", "plain_finetune"}
    assert all(0 <= v <= 1 for v in result.accuracy.values())


def _cli(capsys, *args):
    code = main(["transfer", *args])
    return code, capsys.readouterr().err.strip().splitlines()


def test_cli_refusals_are_one_line_and_write_nothing(quick_zoo, tmp_path, capsys):
    source, base, target = _paths(quick_zoo)
    zoo = Path(quick_zoo)
    out = tmp_path / "out"
    common = ["--source", source, "--source-base", base, "--out", str(out), "--quiet"]
    cases = [
        (["--method", "nope", "--target", target, "--task", "reverse"], "unknown transfer method"),
        (["--method", "laten", "--target", target, "--task", "nope"], "unknown task"),
        (["--method", "laten", "--target", str(zoo / "small/reverse"), "--task", "reverse"], "is a fine-tune"),
        (["--method", "laten", "--target", str(tmp_path / "missing"), "--task", "reverse"], "not found"),
        (["--method", "laten", "--target", target, "--task", "reverse", "--param", "rate=3"], "rate"),
        (["--method", "postpkt", "--target", target, "--task", "reverse", "--data",
          str(tmp_path / "none.jsonl")], "--data"),
    ]
    for args, expected in cases:
        code, err = _cli(capsys, *common, *args)
        assert code == 2 and len(err) == 1 and expected in err[0], (args, err)
        assert not out.exists()
    code, err = _cli(capsys, "--source", source, "--source-base", target, "--target", target,
                     "--task", "reverse", "--method", "laten", "--out", str(out))
    assert code == 2 and "not a fine-tune of the source base" in err[-1] and not out.exists()
    code, err = _cli(capsys, "--source", str(zoo / "small/reverse"), "--source-base", target,
                     "--target", str(zoo / "large/base"), "--task", "reverse", "--method", "laten",
                     "--out", str(out))
    assert code == 2 and "larger than the source" in err[-1] and not out.exists()
