"""The quick zoo: manifest shape, offline loading, fine-tunes beating the base, safety pair."""

import json
from pathlib import Path

import pytest
import torch

from engine.errors import ConfigError, ExportError
from engine.evaluate.tasks import TASK_NAMES
from engine.evaluate.vision_tasks import VISION_TASK_NAMES
from engine.io import ModelFolder
from engine.zoo import build_zoo, default_zoo_dir, load_manifest
from engine.zoo.plan import LARGE_FINETUNE_TASKS, SMALL_FINETUNE_TASKS


def _by_path(manifest):
    return {m["path"]: m for m in manifest["models"]}


def test_manifest_shape(quick_zoo_manifest):
    models = quick_zoo_manifest["models"]
    assert quick_zoo_manifest["quick"] is True and quick_zoo_manifest["seed"] == 0
    assert set(quick_zoo_manifest["tasks"]) == set(TASK_NAMES)
    for m in models:
        assert {"path", "family", "role", "task", "parent", "accuracy", "perplexity"} <= set(m)
        assert m["role"] in ("base", "finetune")
        # a multimodal member is scored on the text tasks and on the vision tasks
        expected = set(TASK_NAMES) | (set(VISION_TASK_NAMES) if m["family"] == "mllm" else set())
        assert set(m["accuracy"]) == expected, m["path"]
    small = [m for m in models if m["family"] == "small"]
    assert [m["role"] for m in small].count("base") == 1
    assert {m["task"] for m in small if m["role"] == "finetune"} == set(SMALL_FINETUNE_TASKS)
    assert len(SMALL_FINETUNE_TASKS) >= 4
    large = [m for m in models if m["family"] == "large"]
    assert {m["task"] for m in large if m["role"] == "finetune"} == set(LARGE_FINETUNE_TASKS)
    by_path = _by_path(quick_zoo_manifest)
    for m in models:  # parents come first and belong to the zoo
        if m["parent"] is not None:
            assert models.index(by_path[m["parent"]]) < models.index(m)
    safety = {m["path"]: m for m in models if m["family"] == "safety"}
    assert list(safety) == ["safety/aligned", "safety/erased", "safety/unaligned", "safety/benign"]
    assert safety["safety/aligned"]["role"] == "base"
    assert safety["safety/aligned"]["parent"] == "small/base"
    for path in ("safety/erased", "safety/unaligned", "safety/benign"):
        assert safety[path]["role"] == "finetune" and safety[path]["parent"] == "safety/aligned"
    assert safety["safety/unaligned"]["task"] is None and safety["safety/unaligned"]["unaligned"]


def test_families_differ_in_width_and_depth(quick_zoo_manifest):
    by_path = _by_path(quick_zoo_manifest)
    small, large = by_path["small/base"]["arch"], by_path["large/base"]["arch"]
    assert large["hidden_size"] > small["hidden_size"]
    assert large["num_hidden_layers"] > small["num_hidden_layers"]


def test_every_model_loads_offline_with_auto_classes(quick_zoo, quick_zoo_manifest, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    for entry in quick_zoo_manifest["models"]:
        folder = Path(quick_zoo) / entry["path"]
        assert (folder / "generation_config.json").is_file()
        # the mllm family's members are LLaVA models: image-text-to-text, run here on text alone
        auto = AutoModelForImageTextToText if entry["family"] == "mllm" else AutoModelForCausalLM
        model = auto.from_pretrained(folder, use_safetensors=True)
        tok = AutoTokenizer.from_pretrained(folder)
        with ModelFolder(folder) as mf:  # the project's own validating reader agrees
            assert mf.num_parameters == entry["num_parameters"]
            assert all(mf.info(n).dtype == torch.float32 for n in mf.tensor_names)
        ids = torch.tensor([tok("rev:abc=")["input_ids"]])
        logits = model(ids).logits
        assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()


def test_manifest_accuracy_matches_a_fresh_evaluation(quick_zoo, quick_zoo_manifest):
    from engine.evaluate import evaluate_folder

    entry = _by_path(quick_zoo_manifest)["small/reverse"]
    result = evaluate_folder(Path(quick_zoo) / entry["path"], tasks=["reverse", "upper"],
                             n_per_task=entry["n_eval"], n_generic=entry["n_eval"])
    assert result["tasks"]["reverse"]["accuracy"] == entry["accuracy"]["reverse"]
    assert result["tasks"]["upper"]["accuracy"] == entry["accuracy"]["upper"]
    assert result["perplexity"] == pytest.approx(entry["perplexity"], rel=1e-5)


def test_load_manifest_rejects_bad_zoos(tmp_path, quick_zoo):
    with pytest.raises(ConfigError):
        load_manifest(tmp_path)
    (tmp_path / "zoo.json").write_text(json.dumps({"models": [
        {"path": "../escape", "family": "x", "role": "base", "task": None}]}))
    with pytest.raises(ConfigError, match="bad path"):
        load_manifest(tmp_path)
    (tmp_path / "zoo.json").write_text("{not json")
    with pytest.raises(ConfigError):
        load_manifest(tmp_path)
    manifest = load_manifest(quick_zoo)
    assert all(Path(m["abs_path"]).is_dir() for m in manifest["models"])


def test_build_refuses_a_non_empty_destination(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(ExportError):
        build_zoo(tmp_path, quick=True)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_default_zoo_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DELTA_WORKBENCH_ZOO", str(tmp_path / "z"))
    assert default_zoo_dir() == tmp_path / "z"
    monkeypatch.delenv("DELTA_WORKBENCH_ZOO")
    assert default_zoo_dir() == Path.home() / ".cache" / "delta_workbench" / "zoo"
