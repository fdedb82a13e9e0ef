"""Issue 12, item 3: bad tokenizer sections through `python -m engine merge`: a union of
tokenizers of different types, a `tokens` entry naming a model that is not merged (or a token or
row it lacks), both `tokenizer` and `tokenizer_source`, a chat template that is none, a union
whose base has no tokenizer. Each is refused before any work: exit 2, one line on stderr naming
the recipe key (and the models), nothing written."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml

from engine.__main__ import main
from tests.io.builders import TINY_CONFIG, snapshot, tiny_tensors, write_model
from tests.merge.test_vocab import CHAT, WORDS, save_tokenizer


@pytest.fixture
def models(tmp_path) -> dict[str, Path]:
    out = {}
    specs = {"base": (WORDS, (), "wordlevel"), "chat": (WORDS, CHAT, "wordlevel"),
             "bpe": (WORDS, (), "bpe"), "other": (WORDS, (), "wordlevel"), "bare": None}
    for i, (name, spec) in enumerate(specs.items()):
        vocab = len(WORDS) + (2 if name == "chat" else 0)
        folder = write_model(tmp_path / "models" / name, tiny_tensors(seed=i, vocab=vocab),
                             {**TINY_CONFIG, "vocab_size": vocab})
        if spec is not None:
            save_tokenizer(folder, *spec)
        out[name] = folder
    return out


def recipe(models, names=("base", "chat"), **extra):
    return {"merge_method": "linear",
            "models": [{"model": str(models[n]), "parameters": {"weight": 1.0}} for n in names], **extra}


CASES = {
    "union of WordLevel and BPE": (
        lambda m: recipe(m, ("base", "bpe"), tokenizer={"source": "union"}),
        ["recipe key tokenizer.source", "union of tokenizers of different types", "WordLevel", "BPE",
         str(Path("models") / "bpe")]),
    "tokens from a model not merged": (
        lambda m: recipe(m, tokenizer={"tokens": {"<x>": {"source": str(m["other"])}}}),
        ["recipe key tokenizer.tokens['<x>'].source", "is not one of the merged models", "other"]),
    "tokens from a folder that does not exist": (
        lambda m: recipe(m, tokenizer={"tokens": {"<x>": {"source": str(m["base"].parent / "nope")}}}),
        ["recipe key tokenizer.tokens['<x>'].source", "no such local model folder"]),
    "a token the named model lacks": (
        lambda m: recipe(m, tokenizer={"tokens": {"<x>": {"source": {
            "kind": "model_token", "model": str(m["base"]), "token": "<|im_start|>"}}}}),
        ["recipe key tokenizer.tokens['<x>'].source", "has no token '<|im_start|>'"]),
    "a row beyond the named model's": (
        lambda m: recipe(m, tokenizer={"tokens": {"<x>": {"source": {
            "kind": "model_token", "model": str(m["chat"]), "token_id": 400}}}}),
        ["recipe key tokenizer.tokens['<x>'].source", "token id 400 is outside", "21 rows"]),
    "token and token_id both": (
        lambda m: recipe(m, tokenizer={"tokens": {"<x>": {"source": {
            "kind": "model_token", "model": str(m["chat"]), "token_id": 1, "token": "a"}}}}),
        ["tokenizer.tokens.<x>", "exactly one of token_id or token"]),
    "tokenizer and tokenizer_source": (
        lambda m: recipe(m, tokenizer={"source": "union"}, tokenizer_source="base"),
        ["one of tokenizer_source or tokenizer"]),
    "a chat template that is none": (
        lambda m: recipe(m, tokenizer={"source": "union"}, chat_template="no-such-template"),
        ["recipe key chat_template", "'no-such-template'", "chatml"]),
    "a union whose base has no tokenizer": (
        lambda m: recipe(m, ("bare", "chat"), tokenizer={"source": "union"}),
        ["recipe key models[0].model", "has no tokenizer files", "bare"]),
    "padding to a multiple of 0": (
        lambda m: recipe(m, tokenizer={"source": "union", "pad_to_multiple_of": 0}),
        ["tokenizer.pad_to_multiple_of", "greater than 0"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_tokenizer_section_is_refused_in_one_line_naming_the_key(models, tmp_path, capsys, case):
    build, needles = CASES[case]
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(build(models)))
    out = tmp_path / "out" / "merged"
    before = snapshot(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["merge", str(path), "--out", str(out), "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    assert snapshot(tmp_path) == before and not out.exists()


def test_the_union_done_right_merges(models, tmp_path, capsys):
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe(models, tokenizer={"source": "union"}, chat_template="chatml")))
    code = main(["merge", str(path), "--out", str(tmp_path / "out"), "--quiet", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert '"vocab_size": 21' in (tmp_path / "out" / "config.json").read_text()


def test_a_union_that_moves_rows_is_refused_for_calibrated_methods(models, tmp_path, capsys):
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump({**recipe(models, tokenizer={"source": "union"}), "merge_method": "fisher"}))
    before = snapshot(tmp_path)
    code = main(["merge", str(path), "--out", str(tmp_path / "out"), "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "recipe key tokenizer" in err and "fisher calibrates" in err and "\n" not in err, err
    assert snapshot(tmp_path) == before
