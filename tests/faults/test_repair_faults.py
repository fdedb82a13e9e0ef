"""Bad input to ``repair``: a one-line error of the named kind naming the file and tensor (or
option), exit 2 from the command line, nothing written; a dead column is handled as the
authors do (H_jj = 1), a NaN/Inf Hessian refused naming the tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.__main__ import main
from engine.errors import ConfigError, IncompatibleModelsError, NonFiniteError, ParameterError
from engine.evaluate.own_data import split_of
from engine.repair.run import repair
from tests.faults.refusal import assert_refused

Q0 = "model.layers.0.self_attn.q_proj.weight"
O0 = "model.layers.0.self_attn.o_proj.weight"


@pytest.fixture(scope="module")
def zoo(quick_zoo):
    root = Path(quick_zoo)
    return {"aligned": root / "safety/aligned", "erased": root / "safety/erased",
            "base": root / "small/base", "large": root / "large/reverse"}


def edited_copy(source: Path, dest: Path, edit) -> Path:
    shutil.copytree(source, dest)
    tensors = load_file(str(dest / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    (dest / "delta_workbench_manifest.json").unlink(missing_ok=True)
    return dest


def test_a_finetune_of_another_shape_is_refused_naming_a_tensor(tmp_path, zoo):
    out = tmp_path / "out"
    assert_refused(tmp_path, lambda: repair(zoo["aligned"], zoo["large"], out, "safe_delta"),
                   IncompatibleModelsError, str(zoo["large"]), "aligned model's shape", "tensor '")


def test_a_finetune_with_another_tensor_set_is_refused_naming_the_tensor(tmp_path, zoo):
    models = tmp_path / "models"
    extra = edited_copy(zoo["erased"], models / "extra",
                        lambda t: t.__setitem__("model.leftover_head.weight", torch.zeros(2, 2)))
    missing = edited_copy(zoo["erased"], models / "missing", lambda t: t.pop(O0))
    assert_refused(tmp_path, lambda: repair(zoo["aligned"], extra, tmp_path / "o", "safe_delta"),
                   IncompatibleModelsError, str(extra), "'model.leftover_head.weight'")
    assert_refused(tmp_path, lambda: repair(zoo["aligned"], missing, tmp_path / "o", "delta_scale"),
                   IncompatibleModelsError, str(missing), O0)


def test_an_unaligned_model_of_another_shape_is_refused(tmp_path, zoo):
    assert_refused(tmp_path, lambda: repair(zoo["aligned"], zoo["erased"], tmp_path / "o", "irr",
                                            unaligned=zoo["large"]),
                   IncompatibleModelsError, "unaligned model", str(zoo["large"]))


def test_irr_without_a_safety_vector_is_refused_before_anything_is_read(tmp_path, zoo):
    for method in ("irr", "resta"):
        assert_refused(tmp_path, lambda: repair(zoo["aligned"], zoo["erased"], tmp_path / "o", method),
                       ParameterError, f"{method} needs a safety vector", "--unaligned",
                       "safety_vector=alignment_delta")


def test_unknown_method_and_parameter_are_refused(tmp_path, zoo):
    assert_refused(tmp_path, lambda: repair(zoo["aligned"], zoo["erased"], tmp_path / "o", "safety"),
                   ParameterError, "unknown repair method 'safety'", "safe_delta")
    assert_refused(tmp_path, lambda: repair(zoo["aligned"], zoo["erased"], tmp_path / "o",
                                            "safe_delta", {"budgte": "paper"}),
                   ParameterError, "safe_delta parameters", "budgte")
    assert_refused(tmp_path, lambda: repair(zoo["aligned"], zoo["erased"], tmp_path / "o",
                                            "safe_delta", {"budget": "half"}),
                   ParameterError, "budget")


def test_a_calibration_file_without_refusals_is_refused_naming_it(tmp_path, zoo):
    lines = [{"prompt": f"rev:{w}=", "answer": "not what the aligned model says"}
             for w in ("abc", "hello", "world", "zebra", "mango", "plum", "kiwi", "lemon", "pear",
                       "fig", "lime", "date")]
    lines = [line for line in lines if split_of(line["prompt"]) == "dev"]
    assert lines
    data = tmp_path / "safety.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert_refused(tmp_path, lambda: repair(zoo["aligned"], zoo["erased"], tmp_path / "o",
                                            "safe_delta", calibration=data),
                   ConfigError, str(data), "--calibration", "no refusal examples")


def test_a_nan_in_a_hessian_is_refused_naming_the_tensor(tmp_path, zoo):
    # a finite but huge norm weight: the inputs of q/k/v are finite, their squares are not, so
    # the first target's safety Hessian holds Inf
    models = tmp_path / "models"
    broken = edited_copy(zoo["aligned"], models / "aligned",
                         lambda t: t["model.layers.0.input_layernorm.weight"].__setitem__(0, 1e38))
    err = assert_refused(tmp_path, lambda: repair(broken, zoo["erased"], tmp_path / "o",
                                                  "safe_delta", device="cpu"),
                         NonFiniteError, "NaN/Inf", "Hessian", Q0)
    assert err.tensor == Q0


def test_a_nan_in_an_input_tensor_is_refused_naming_the_tensor(tmp_path, zoo):
    models = tmp_path / "models"
    broken = edited_copy(zoo["erased"], models / "erased",
                         lambda t: t["model.norm.weight"].__setitem__(0, float("nan")))
    assert_refused(tmp_path, lambda: repair(zoo["aligned"], broken, tmp_path / "o", "delta_scale"),
                   NonFiniteError, str(broken), "model.norm.weight")


def test_a_dead_column_is_handled_as_the_authors_do(tmp_path, zoo):
    # a zero in the input norm's weight: column 3 of q/k/v never sees any input
    aligned = edited_copy(zoo["aligned"], tmp_path / "aligned",
                          lambda t: t["model.layers.0.input_layernorm.weight"].__setitem__(3, 0.0))
    erased = edited_copy(zoo["erased"], tmp_path / "erased",
                         lambda t: t["model.layers.0.input_layernorm.weight"].__setitem__(3, 0.0))
    result = repair(aligned, erased, tmp_path / "sd", "safe_delta", {"budget": "fraction"},
                    device="cpu")
    assert result.report[Q0]["dead_columns"] == 1
    assert all(torch.isfinite(t).all() for t in load_file(str(tmp_path / "sd/model.safetensors")).values())
    result = repair(aligned, erased, tmp_path / "irr", "irr",
                    {"safety_vector": "alignment_delta", "task": "reverse"},
                    unaligned=zoo["base"], device="cpu")
    assert result.report[Q0]["dead_columns"] == 1
    out = load_file(str(tmp_path / "irr/model.safetensors"))
    a = load_file(str(aligned / "model.safetensors"))
    assert torch.equal(out[Q0][:, 3], a[Q0][:, 3])  # IRR: a dead column loses its delta


def test_irr_without_task_data_for_a_model_in_no_zoo_is_refused(tmp_path, zoo):
    erased = edited_copy(zoo["erased"], tmp_path / "models/erased", lambda t: None)
    assert_refused(tmp_path, lambda: repair(zoo["aligned"], erased, tmp_path / "o", "irr",
                                            {"safety_vector": "alignment_delta"}, unaligned=zoo["base"]),
                   ParameterError, str(erased), "--task-data")
    assert_refused(tmp_path, lambda: repair(zoo["aligned"], erased, tmp_path / "o", "irr",
                                            {"safety_vector": "alignment_delta", "task": "nosuch"},
                                            unaligned=zoo["base"]),
                   ParameterError, "nosuch")


def test_the_cli_prints_one_line_and_exits_2(tmp_path, zoo, capsys):
    code = main(["repair", "--method", "irr", "--aligned", str(zoo["aligned"]), "--finetuned",
                 str(zoo["erased"]), "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: irr needs a safety vector")
    assert not (tmp_path / "o").exists()


def test_a_destination_that_is_not_empty_is_refused_before_any_model_loads(tmp_path, zoo, monkeypatch):
    import engine.evaluate.loading as loading
    from engine.errors import ExportError

    monkeypatch.setattr(loading, "load_model_folder", lambda *a, **k: pytest.fail("a model was loaded"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_refused(tmp_path, lambda: repair(zoo["aligned"], zoo["erased"], out, "safe_delta"),
                   ExportError, str(out))


def test_a_match_manifest_that_is_not_a_repair_manifest_is_refused(tmp_path, zoo):
    bogus = tmp_path / "manifest.json"
    bogus.write_text(json.dumps({"kind": "merge"}))
    assert_refused(tmp_path, lambda: repair(zoo["aligned"], zoo["erased"], tmp_path / "o", "random_mask",
                                            {"match_manifest": str(bogus)}),
                   ConfigError, str(bogus), "not the manifest of a repair output")
