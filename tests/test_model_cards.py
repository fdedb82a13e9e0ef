"""Model cards (issue 11, item 7): every export (merge, rebuild, extract-lora) writes a README.md
whose YAML front matter parses (base_model, library_name, tags with the method, the recipe or
parameters), written in the same atomic write as the weights and listed with its sha256 in the
manifest; a merge run with an evaluation carries the table, equal to scoring the published
folder afterwards."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from engine.io.writer import MANIFEST_NAME
from tests.io.builders import tiny_tensors, write_model


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    head, sep, _ = card[4:].partition("\n---\n")
    assert sep, "the front matter is not closed"
    data = yaml.safe_load(head + "\n")  # the closing line's break ends the last value
    assert isinstance(data, dict)
    return data


def card_of(folder: Path) -> tuple[str, dict]:
    """The card's text, checked to be listed in the manifest with its real sha256 and size."""
    raw = (folder / "README.md").read_bytes()
    files = json.loads((folder / MANIFEST_NAME).read_text())["files"]
    assert files["README.md"] == {"sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw)}
    return raw.decode(), front_matter(raw.decode())


def test_merge_card_carries_the_recipe_and_never_the_tokenizer_folders_readme(tmp_path):
    from engine.merge.executor import run_merge
    from engine.recipe import parse_recipe, parse_recipe_text
    from engine.evaluate.tokenizer import tokenizer_files

    base = write_model(tmp_path / "base", tiny_tensors(seed=0))
    ft_a = write_model(tmp_path / "ft-a", tiny_tensors(seed=1))
    ft_b = write_model(tmp_path / "ft-b", tiny_tensors(seed=2))
    # the tokenizer source is an input folder with a README.md of its own: never copied
    for name, data in tokenizer_files(tmp_path / "tok").items():
        (ft_b / name).write_bytes(data)
    (ft_b / "README.md").write_text("---\nbase_model: evil\n---\nnot our card\n")
    recipe = parse_recipe({"merge_method": "ties", "base_model": str(base),
                           "models": [{"model": str(ft_a), "parameters": {"weight": 0.7, "density": 0.5}},
                                      {"model": str(ft_b), "parameters": {"weight": 0.3, "density": 0.5}}],
                           "parameters": {"normalize": True}, "tokenizer_source": str(ft_b)})
    out = run_merge(recipe, tmp_path / "out", device="cpu").out
    assert (out / "tokenizer.json").is_file()  # the tokenizer did come from ft-b
    card, front = card_of(out)
    assert "not our card" not in card and front["base_model"] == str(base)
    assert front["library_name"] == "transformers"
    assert front["tags"] == ["merge", "delta-workbench", "ties"]
    meta = front["delta_workbench"]
    assert meta["method"] == "ties" and meta["inputs"] == [str(ft_a), str(ft_b)]
    assert meta["parameters"] == {"normalize": True}
    assert parse_recipe_text(meta["recipe"]) == recipe  # the recipe round-trips
    assert parse_recipe_text((out / "merge_recipe.yml").read_text()) == recipe
    assert "| normalize | `True` |" in card and "`ft-a`" in card and "## Evaluation" not in card


def test_merge_with_evaluation_puts_the_published_models_scores_in_its_card(tmp_path, quick_zoo):
    from engine.__main__ import main
    from engine.evaluate import evaluate_folder

    zoo = Path(quick_zoo)
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": str(zoo / "small/base"),
        "models": [{"model": str(zoo / "small/reverse"), "parameters": {"weight": 1.0}},
                   {"model": str(zoo / "small/upper"), "parameters": {"weight": 1.0}}]}))
    out = tmp_path / "merged"
    assert main(["merge", str(recipe), "--out", str(out), "--eval", "--json", "--quiet"]) == 0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    again = evaluate_folder(out)  # scored independently, after publication
    assert manifest["evaluation"] == again
    card, front = card_of(out)
    assert front["tags"][-1] == "task_arithmetic"
    header, rule, row = card.split("## Evaluation\n\n")[1].splitlines()[:3]
    columns = [c.strip() for c in header.strip("|").split("|")][1:]
    values = [float(c) for c in row.strip("|").split("|")[1:]]
    want = {t: s["accuracy"] for t, s in again["tasks"].items()} | {"perplexity": again["perplexity"]}
    assert columns == list(want) and rule.count("---") == len(columns) + 1
    assert values == pytest.approx([want[c] for c in columns], abs=5e-4)


def test_rebuilt_fine_tune_card_names_the_method_and_its_parameters(tmp_path):
    from engine.compress import Artifact, compress, decompress
    from tests.compress.helpers import make_pair

    base, ft, _, _ = make_pair(tmp_path)
    compress(base, ft, tmp_path / "art", "svd", ratio=8, device="cpu")
    out = decompress(tmp_path / "art", base, tmp_path / "rebuilt", device="cpu").out
    card, front = card_of(out)
    artifact = Artifact(tmp_path / "art")
    assert front["base_model"] == str(Path(base).resolve())  # the base's folder, as opened
    assert front["library_name"] == "transformers"
    assert front["tags"][:3] == ["merge", "delta-workbench", "svd"]
    assert front["delta_workbench"]["inputs"] == [str(artifact.path)]
    params = front["delta_workbench"]["parameters"]
    assert {k: params[k] for k in artifact.params} == artifact.params
    assert f"({artifact.total_bytes} bytes, target ratio 8x)" in card


def test_extracted_adapter_card_is_written_by_the_engine(tmp_path):
    from engine.lora.extract import ExtractOptions, extract_lora
    from tests.lora.peft_builders import tiny_llama
    from tests.lora.test_extract import _finetune

    model = tiny_llama(tmp_path / "base")
    _finetune(model, tmp_path / "ft")
    options = ExtractOptions(rank=4, sv_cutoff=0.1, dtype="float16")
    extract_lora(tmp_path / "base", tmp_path / "ft", tmp_path / "lora", options)
    _, front = card_of(tmp_path / "lora")
    assert front["base_model"] == str((tmp_path / "base").resolve())
    assert front["library_name"] == "peft"
    assert front["tags"] == ["merge", "delta-workbench", "extract-lora", "lora"]
    assert front["delta_workbench"]["parameters"] == options.model_dump(mode="json")
    assert front["delta_workbench"]["inputs"] == [str((tmp_path / "ft").resolve())]


def test_the_export_pages_merge_job_can_score_its_output(tmp_path, monkeypatch, quick_zoo):
    from engine.jobs.kinds import get_kind

    monkeypatch.setenv("DELTA_WORKBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DELTA_WORKBENCH_ZOO", str(quick_zoo))
    zoo = Path(quick_zoo)
    recipe = yaml.safe_dump({"merge_method": "linear",
                             "models": [{"model": str(zoo / "small/sort"), "parameters": {"weight": 1.0}}]})
    kind = get_kind("merge")
    out = tmp_path / "home" / "exports" / "sorted"
    result = kind.run(kind.params_class(recipe_yaml=recipe, out=str(out), evaluate=True), lambda *_: None)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert result["evaluation"] == manifest["evaluation"]
    card, front = card_of(out)
    assert "base_model" not in front  # a base-free merge names none
    sort = manifest["evaluation"]["tasks"]["sort"]["accuracy"]
    assert f"| {sort:.3f} |" in card.split("## Evaluation")[1]
