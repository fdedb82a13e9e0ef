"""fisher/regmean calibrated on the user's JSONL file: the same statistics as the zoo path on the
same examples, the dev split only, per-model files, paths by the recipe's rules, LoRA inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from engine.evaluate.calibration_data import CalibrationData
from engine.evaluate.own_data import split_of
from engine.io import ModelFolder
from engine.merge import calibration as cal
from engine.merge.calibration import CalibrationSettings, calibration_examples, model_statistics
from engine.merge.executor import run_merge
from engine.recipe import load_recipe, parse_recipe

K = 4  # calibration examples per model


@pytest.fixture(scope="module")
def small(quick_zoo):
    torch.set_num_threads(1)
    root = Path(quick_zoo) / "small"
    return {name: root / name for name in ("base", "reverse", "upper")}


def write_jsonl(path: Path, examples) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in examples))
    return path


def heldout_markers(count: int) -> list[tuple[str, str]]:
    """Examples whose prompts fall in the held-out split, each carrying a marker."""
    out, i = [], 0
    while len(out) < count:
        prompt = f"MARKER {i} rev:abc="
        if split_of(prompt) == "heldout":
            out.append((prompt, "MARKER"))
        i += 1
    return out


def all_dev_seed(tasks: list[str], n: int) -> int:
    """A seed whose zoo calibration examples of every task all fall in the own-data dev split,
    so a file of exactly those examples is calibrated on exactly them."""
    for seed in range(100_000):
        if all(split_of(p) == "dev" for t in tasks for p, _ in calibration_examples(t, n, seed)):
            return seed
    raise AssertionError("no seed found")


def _load(path):
    with ModelFolder(path) as mf:
        return {n: t.clone() for n, t in mf.iter_tensors()}


@pytest.mark.parametrize("method", ["fisher", "regmean"])
def test_a_file_of_the_zoo_examples_merges_as_the_zoo_path(small, tmp_path, method):
    """The zoo task's own examples written to JSONL (plus held-out lines that must be skipped):
    a merge calibrated on the files equals the merge calibrated on the zoo tasks."""
    seed = all_dev_seed(["reverse", "upper"], K)
    rev = write_jsonl(tmp_path / "rev.jsonl",
                      calibration_examples("reverse", K, seed) + heldout_markers(3))
    upp = write_jsonl(tmp_path / "upp.jsonl", heldout_markers(2) + calibration_examples("upper", K, seed))
    models = [{"model": str(small["reverse"]), "parameters": {"weight": 1.0}},
              {"model": str(small["upper"]), "parameters": {"weight": 2.0}}]
    zoo = parse_recipe({"merge_method": method, "base_model": str(small["base"]),
                        "parameters": {"calibration": {"n": K, "seed": seed, "batch_size": 3}},
                        "models": models})
    own = parse_recipe({
        "merge_method": method, "base_model": str(small["base"]),
        # the global file is model 1's; model 0's own file overrides it
        "parameters": {"calibration": {"data": str(upp), "n": K, "seed": 7, "batch_size": 3}},
        "models": [{**models[0], "parameters": {**models[0]["parameters"],
                                                "calibration": {"data": str(rev)}}}, models[1]]})
    a = _load(run_merge(zoo, tmp_path / "zoo", device="cpu").out)
    result = run_merge(own, tmp_path / "own", device="cpu")
    b = _load(result.out)
    assert result.warnings == []  # n equals each dev split: no shortfall
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7)
    # the statistics mattered: a data file of other examples gives another merge
    other = write_jsonl(tmp_path / "other.jsonl", [(f"rev:{w}=", w[::-1]) for w in
                                                   ("qwerty", "asdfgh", "zxcvbn", "poiuyt", "lkjhgf",
                                                    "mnbvcx", "abcdef", "ghijkl", "mnopqr", "stuvwx")])
    third = parse_recipe({**own.model_dump(exclude_none=True),
                          "parameters": {"calibration": {"data": str(other), "n": 3}},
                          "models": models})
    c = _load(run_merge(third, tmp_path / "other", device="cpu").out)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(c[name], a[name], rtol=1e-4, atol=1e-6)


def test_only_dev_lines_reach_the_encoder(small, tmp_path, monkeypatch):
    dev = [(f"rev:{w}=", w[::-1]) for w in ("abc", "hello", "world", "zebra", "mango", "plum",
                                             "kiwi", "lemon", "grape", "melon", "peach", "apple")]
    dev = [e for e in dev if split_of(e[0]) == "dev"]
    assert len(dev) >= 3
    path = write_jsonl(tmp_path / "mine.jsonl", heldout_markers(5)[:2] + dev + heldout_markers(5)[2:])
    seen: list = []
    real = cal.encode

    def spy(tokenizer, examples):
        seen.append(list(examples))
        return real(tokenizer, examples)

    monkeypatch.setattr(cal, "encode", spy)
    recipe = {"merge_method": "fisher", "parameters": {"calibration": {"data": str(path), "n": 100}},
              "models": [{"model": str(small["reverse"]), "parameters": {"weight": 1.0}},
                         {"model": str(small["upper"]), "parameters": {"weight": 1.0}}]}
    result = run_merge(parse_recipe(recipe), tmp_path / "out", device="cpu")
    assert len(seen) == 2  # one per model, each every dev line (n exceeds the dev split)
    for examples in seen:
        assert sorted(examples) == sorted(dev) and not any("MARKER" in p for p, _ in examples)
    # the shortfall is a warning naming the file and both counts, in the result and manifest
    note = next(w for w in result.warnings if "mine.jsonl" in w)
    assert f"100 calibration examples asked, its dev split holds {len(dev)} (of {len(dev) + 5})" in note
    manifest = json.loads((result.out / "delta_workbench_manifest.json").read_text())
    assert note in manifest["warnings"]


def test_the_draw_is_seeded_without_replacement_from_the_dev_split(tmp_path):
    examples = [(f"q{i}", f"a{i}") for i in range(60)]
    data = CalibrationData.read(write_jsonl(tmp_path / "d.jsonl", examples), named_by="test")
    dev = [e for e in examples if split_of(e[0]) == "dev"]
    assert list(data.examples) == dev and data.lines == 60 and 0 < len(dev) < 60
    a = data.draw(10, seed=1)
    assert a == data.draw(10, seed=1) and a != data.draw(10, seed=2)
    assert len(set(a)) == 10 and set(a) <= set(dev)
    assert sorted(data.draw(1000)) == sorted(dev) and data.shortfall(len(dev)) is None
    assert str(tmp_path / "d.jsonl") in data.shortfall(len(dev) + 1)


def test_a_relative_data_path_resolves_against_the_recipe_folder(small, tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    folder.mkdir()
    write_jsonl(folder / "mine.jsonl", [(f"rev:{w}=", w[::-1]) for w in ("abc", "hello", "world",
                                                                        "zebra", "mango", "plum")])
    (folder / "r.yml").write_text(yaml.safe_dump({
        "merge_method": "regmean", "parameters": {"calibration": {"data": "mine.jsonl", "n": 2}},
        "models": [{"model": str(small["reverse"])}, {"model": str(small["upper"])}]}))
    monkeypatch.chdir(tmp_path)  # not the recipe's folder: the file is found next to the recipe
    seen: list = []
    real = CalibrationData.read.__func__

    def spy(cls, path, *, named_by):
        seen.append((Path(path), named_by))
        return real(cls, path, named_by=named_by)

    monkeypatch.setattr(CalibrationData, "read", classmethod(spy))
    run_merge(load_recipe(folder / "r.yml"), tmp_path / "out", recipe_dir=folder, device="cpu")
    assert seen == [(folder / "mine.jsonl", "recipe key parameters.calibration.data")]


def test_the_what_if_calibrates_on_the_file_as_run_merge(small, tmp_path):
    from engine.merge.whatif import WhatIfSession

    path = write_jsonl(tmp_path / "mine.jsonl", [(f"upp:{w}=", w.upper()) for w in
                                                 ("abc", "hello", "world", "zebra", "mango", "plum",
                                                  "kiwi", "lemon")])
    params = {"calibration": {"data": str(path), "n": 3, "seed": 1}}
    session = WhatIfSession(small["base"], [small["reverse"], small["upper"]], device="cpu",
                            n_per_task=4, n_generic=0, allowed_roots=[tmp_path, small["base"].parent])
    in_memory = session.merge("regmean", None, params)
    on_disk = _load(run_merge(parse_recipe({
        "merge_method": "regmean", "parameters": params,
        "models": [{"model": str(small["reverse"])}, {"model": str(small["upper"])}]}),
        tmp_path / "out", device="cpu").out)
    for name, tensor in on_disk.items():
        torch.testing.assert_close(in_memory[name], tensor, rtol=1e-6, atol=1e-7)
    # an edited file is other statistics, not a stale cache entry
    write_jsonl(path, [(f"upp:{w}=", w.upper()) for w in ("qwerty", "asdf", "zxcv", "poiu", "lkjh",
                                                           "mnbv", "rtyu", "fghj")])
    edited = session.merge("regmean", None, params)
    assert any(not torch.equal(edited[n], in_memory[n]) for n in in_memory if in_memory[n].ndim == 2)


def test_statistics_of_a_lora_adapter_are_those_of_base_plus_adapter(small, tmp_path):
    """An adapter (no config.json, no tokenizer in its folder) is calibrated as the model
    base + adapter, with its base's tokenizer."""
    from transformers import LlamaForCausalLM

    from engine.evaluate.loading import load_tokenizer
    from engine.lora.finetune import AdapterFinetune
    from tests.lora.peft_builders import make_adapter

    model = LlamaForCausalLM.from_pretrained(small["base"]).eval()
    merged = make_adapter(model, tmp_path / "adapter", target_modules=["q_proj", "v_proj", "down_proj"])
    reference = LlamaForCausalLM.from_pretrained(small["base"]).eval()
    reference.load_state_dict(merged)
    data = CalibrationData.read(write_jsonl(tmp_path / "d.jsonl", [
        (f"rev:{w}=", w[::-1]) for w in ("abc", "hello", "world", "zebra", "mango", "plum", "kiwi")]),
        named_by="test")
    settings = CalibrationSettings(n=4, batch_size=2)
    tokenizer = load_tokenizer(small["base"])
    with ModelFolder(small["base"]) as base, AdapterFinetune(base, tmp_path / "adapter") as finetune:
        for kind in ("fisher", "gram"):
            got = model_statistics(kind, finetune, data, settings)
            want = model_statistics(kind, None, data, settings, model=reference, tokenizer=tokenizer)
            assert set(got) == set(want)
            for name in want:
                g, w = (got[name][0], want[name][0]) if kind == "gram" else (got[name], want[name])
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-8)
            plain = model_statistics(kind, small["base"], data, settings)  # the adapter mattered
            name = "model.layers.1.mlp.down_proj.weight"
            assert not torch.allclose(got[name][0] if kind == "gram" else got[name],
                                      plain[name][0] if kind == "gram" else plain[name])


def test_an_adapter_with_its_own_tokenizer_uses_it(small, tmp_path, monkeypatch):
    import shutil

    from transformers import LlamaForCausalLM

    import engine.evaluate.loading as loading
    from engine.lora.finetune import AdapterFinetune
    from tests.lora.peft_builders import make_adapter

    make_adapter(LlamaForCausalLM.from_pretrained(small["base"]).eval(), tmp_path / "adapter",
                 target_modules=["q_proj"])
    asked: list = []
    real = loading.load_tokenizer
    monkeypatch.setattr(loading, "load_tokenizer",
                        lambda folder, vocab=None: asked.append(Path(folder)) or real(folder, vocab))
    with ModelFolder(small["base"]) as base, AdapterFinetune(base, tmp_path / "adapter") as finetune:
        loading.finetune_tokenizer(finetune)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(small["base"] / name, tmp_path / "adapter" / name)
        loading.finetune_tokenizer(finetune)
        with ModelFolder(small["upper"]) as plain:
            loading.finetune_tokenizer(plain)
    assert asked == [Path(small["base"]), tmp_path / "adapter", Path(small["upper"])]
