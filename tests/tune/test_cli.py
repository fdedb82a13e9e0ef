"""``python -m engine tune`` end to end on the quick zoo: the outputs, the resume, the dev split,
and every bad input a one-line error with the study kept."""

import csv

import pytest
import yaml

from engine.__main__ import main


def write_recipe(tmp_path, zoo, weight="{range: [0, 2]}", extra=""):
    text = f"""merge_method: task_arithmetic
base_model: {zoo}/small/base
models:
  - model: {zoo}/small/reverse
    parameters: {{weight: {weight}}}
  - model: {zoo}/small/upper
    parameters: {{weight: {{range: [0, 2]}}}}
{extra}"""
    path = tmp_path / "tune.yml"
    path.write_text(text)
    return path


def rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_tune_writes_a_plain_best_recipe_and_resumes(quick_zoo, tmp_path, capsys, tune_home):
    recipe = write_recipe(tmp_path, quick_zoo)
    out = tmp_path / "best.yml"
    args = ["tune", str(recipe), "--trials", "3", "--out", str(out), "--sampler", "random", "--seed", "4",
            "--n-per-task", "8", "--quiet", "--json"]
    assert main(args) == 0
    best = yaml.safe_load(out.read_text())
    assert "range" not in out.read_text() and "layer_groups" not in best
    table = rows(out.with_suffix(".trials.csv"))
    assert [r["number"] for r in table] == ["0", "1", "2"]
    assert out.with_suffix(".trials.parquet").exists()
    first = [r["models[0].weight"] for r in table]
    # the study is in the workbench home; the same command with a larger budget resumes it
    assert list((tune_home / "tune").glob("*.journal"))
    assert main([*args[:3], "5", *args[4:]]) == 0
    table = rows(out.with_suffix(".trials.csv"))
    assert [r["number"] for r in table] == ["0", "1", "2", "3", "4"]
    assert [r["models[0].weight"] for r in table[:3]] == first
    # the best recipe re-scored on the dev split reproduces the best trial's score
    import json

    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    from engine.recipe import parse_recipe
    from engine.tune.objective import TrialScorer, settings_for_recipe

    settings = settings_for_recipe(parse_recipe(best), recipe_dir=tmp_path, n_per_task=8)
    assert settings.split == "dev"
    again = TrialScorer(settings).score(best)
    assert again["score"] == pytest.approx(summary["best_score"])
    assert again["tasks"] == summary["best_tasks"]
    assert float(table[summary["best_trial"]]["models[0].weight"]) == best["models"][0]["parameters"]["weight"]


def test_dev_split_never_scores_a_heldout_report_example(quick_zoo):
    """The dev examples of a zoo task are disjoint from the ones a held-out report scores."""
    from engine.evaluate.scoring import DEFAULT_N_PER_TASK
    from engine.evaluate.tasks import TASKS, heldout_examples

    dev = heldout_examples(TASKS["reverse"], DEFAULT_N_PER_TASK + 8)[DEFAULT_N_PER_TASK:]
    report = heldout_examples(TASKS["reverse"], DEFAULT_N_PER_TASK)
    assert not set(dev) & set(report)
    from engine.merge.whatif import WhatIfSession

    session = WhatIfSession(quick_zoo / "small/base", [quick_zoo / "small/reverse"],
                            tasks=["reverse"], n_per_task=8, n_generic=0, split="dev")
    assert session.evaluator.task_sets["reverse"][0] == dev


@pytest.mark.parametrize("weight, message", [
    ("{range: [1, 0.5]}", "models[0].parameters.weight: range [1, 0.5] needs lo < hi"),
    ("{range: [0.5, 0.5]}", "needs lo < hi"),
])
def test_bad_range_is_one_line(quick_zoo, tmp_path, capsys, weight, message):
    recipe = write_recipe(tmp_path, quick_zoo, weight=weight)
    assert main(["tune", str(recipe), "--trials", "2", "--out", str(tmp_path / "b.yml"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err


def test_range_on_a_non_numeric_parameter_is_one_line(quick_zoo, tmp_path, capsys):
    recipe = write_recipe(tmp_path, quick_zoo, weight="1.0",
                          extra="parameters: {int8_mask: {range: [0, 1]}}\n")
    recipe.write_text(recipe.read_text().replace("task_arithmetic", "ties"))
    assert main(["tune", str(recipe), "--trials", "2", "--out", str(tmp_path / "b.yml"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "parameters.int8_mask: a range needs a numeric parameter" in err
    assert len(err.splitlines()) == 1


def test_unreachable_ray_address_is_one_line(quick_zoo, tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    recipe = write_recipe(tmp_path, quick_zoo)
    assert main(["tune", str(recipe), "--trials", "2", "--out", str(tmp_path / "b.yml"), "--quiet",
                 "--ray", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unreachable" in err and f"127.0.0.1:{port}" in err
    assert not (tmp_path / "b.yml").exists()


def test_unknown_task_weight_and_sampler_are_one_line(quick_zoo, tmp_path, capsys):
    recipe = write_recipe(tmp_path, quick_zoo)
    base = ["tune", str(recipe), "--trials", "1", "--out", str(tmp_path / "b.yml"), "--quiet"]
    assert main([*base, "--task-weight", "sort=2"]) == 2
    assert "task weight for 'sort', which is not scored" in capsys.readouterr().err
    assert main([*base, "--sampler", "grid"]) == 2
    assert "unknown sampler 'grid'" in capsys.readouterr().err


def test_merge_out_pareto_front_and_loud_heldout(quick_zoo, tmp_path, capsys):
    import json

    recipe = write_recipe(tmp_path, quick_zoo)
    out = tmp_path / "best.yml"
    merged = tmp_path / "merged"
    assert main(["tune", str(recipe), "--trials", "2", "--out", str(out), "--sampler", "tpe",
                 "--multi-objective", "--task-weight", "upper=2", "--allow-heldout",
                 "--n-per-task", "8", "--merge-out", str(merged), "--quiet", "--json"]) == 0
    captured = capsys.readouterr()
    assert "WARNING: tuning on the HELD-OUT split" in captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    front = rows(out.with_suffix(".pareto.csv"))
    assert sorted(int(r["number"]) for r in front) == summary["pareto"]
    assert summary["best_trial"] in summary["pareto"]
    # the merged model is the normal streaming merge of the best recipe
    assert (merged / "config.json").exists() and list(merged.glob("*.safetensors"))
    from engine.io import ModelFolder

    best = yaml.safe_load(out.read_text())
    w0 = best["models"][0]["parameters"]["weight"]
    w1 = best["models"][1]["parameters"]["weight"]
    with ModelFolder(merged) as m, ModelFolder(quick_zoo / "small/base") as b, \
            ModelFolder(quick_zoo / "small/reverse") as r, ModelFolder(quick_zoo / "small/upper") as u:
        name = "model.layers.0.mlp.up_proj.weight"
        expect = b.get_tensor(name).double() + w0 * (r.get_tensor(name).double() - b.get_tensor(name).double()) \
            + w1 * (u.get_tensor(name).double() - b.get_tensor(name).double())
        assert (m.get_tensor(name).double() - expect).abs().max() < 1e-5


def test_bad_device_is_one_line_before_any_study(quick_zoo, tmp_path, capsys, tune_home):
    recipe = write_recipe(tmp_path, quick_zoo)
    assert main(["tune", str(recipe), "--trials", "1", "--out", str(tmp_path / "b.yml"), "--quiet",
                 "--device", "tpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "device" in err
    assert not (tune_home / "tune").exists()
