"""Every recipe bench/merge_speed.py times is a valid recipe that our merge runs (on a tiny
Llama triple instead of the 270M one), so a bench run never dies on its own recipe, and each
method's output differs from what a wrong recipe (the base copied) would give."""

from __future__ import annotations

import importlib

import pytest
import torch
from safetensors.torch import load_file

from engine.recipe import parse_recipe
from tests.lora.peft_builders import tiny_llama

speed = importlib.import_module("bench.merge_speed")
ALL = speed.MAIN_METHODS + speed.OTHER_SHARED + speed.NEWER_SHARED


@pytest.fixture(scope="module")
def triple(tmp_path_factory):
    root = tmp_path_factory.mktemp("triple")
    folders = {name: root / name for name in ("base", "ft_a", "ft_b")}
    for seed, folder in enumerate(folders.values()):
        tiny_llama(folder, seed=0)
        if seed:  # a fine-tune: the base plus a small delta of its own
            state = load_file(folder / "model.safetensors")
            g = torch.Generator().manual_seed(seed)
            state = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()}
            from safetensors.torch import save_file
            save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folders


def test_the_methods_timed_are_registered_once_each():
    from engine.merge.registry import list_methods

    ours = set(list_methods())
    assert set(ALL) <= ours and len(set(ALL)) == len(ALL)
    # each group of methods has its own results file and README section
    groups = [speed.group_of({"methods": list(g)}) for g in
              (speed.MAIN_METHODS, speed.OTHER_SHARED, speed.NEWER_SHARED)]
    assert len({g[1] for g in groups}) == 3 and len({g[2] for g in groups}) == 3
    assert speed.group_of({"methods": ["ties", "della"]})[1] == speed.RESULTS  # a mix: the headline's


@pytest.mark.parametrize("method", ALL)
def test_each_bench_recipe_merges(method, triple, tmp_path, monkeypatch):
    from engine.merge.executor import run_merge

    monkeypatch.setitem(speed.CONFIG, "num_hidden_layers", 2)
    raw = speed.recipe(method, triple, "float32")
    out = tmp_path / "out"
    run_merge(parse_recipe(raw), out, device="cpu")
    merged = load_file(out / "model.safetensors")
    base = load_file(triple["base"] / "model.safetensors")
    assert merged.keys() == base.keys()
    assert all(v.dtype == torch.bfloat16 for v in merged.values())  # out_dtype: bfloat16
    moved = [k for k in merged if not torch.equal(merged[k].float(), base[k].to(torch.bfloat16).float())]
    assert moved, f"{method}: the output is the base unchanged"
