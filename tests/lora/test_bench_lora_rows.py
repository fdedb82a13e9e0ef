"""The compression table's extract-lora rows (bench/compress_quality.py): the adapter is the
largest rank whose folder, every file counted, fits the ratio's byte budget, and it is rebuilt
as base + adapter."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from engine.compress import folder_bytes
from engine.io import ModelFolder
from tests.lora.peft_builders import tiny_llama
from tests.lora.test_extract import _finetune

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("compress_quality", REPO / "bench" / "compress_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    _finetune(tiny_llama(root / "base"), root / "ft")
    return {"base": str(root / "base"), "abs": str(root / "ft"), "path": "tiny/ft"}


def test_the_rank_is_the_largest_that_fits_the_budget(bench, pair, tmp_path):
    from engine.lora.extract import ExtractOptions, extract_lora

    with ModelFolder(pair["base"]) as base:
        entries = base.num_parameters
    params = {"dtype": "float16"}
    for ratio in (2, 4):
        budget = 2.0 * entries / ratio
        rank, size = bench.lora_adapter(pair, tmp_path / "lora", params, entries, ratio)
        assert size == folder_bytes(tmp_path / "lora") <= budget
        extract_lora(pair["base"], pair["abs"], tmp_path / f"next-{ratio}",
                     ExtractOptions(**params, rank=rank + 1))  # one rank more does not fit
        assert folder_bytes(tmp_path / f"next-{ratio}") > budget
    with pytest.raises(ValueError, match="out of reach"):
        bench.lora_adapter(pair, tmp_path / "lora", params, entries, 10_000)


def test_the_rebuilt_state_is_base_plus_the_adapter(bench, pair, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with ModelFolder(pair["base"]) as base:
        entries = base.num_parameters
    rank, _ = bench.lora_adapter(pair, tmp_path / "lora", {}, entries, 4)
    state = bench.lora_state(pair["base"], tmp_path / "lora")
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pair["base"]),
                                       tmp_path / "lora").merge_and_unload().state_dict()
    assert rank >= 1 and set(state) == set(merged)
    for name, tensor in state.items():
        torch.testing.assert_close(tensor, merged[name], atol=1e-6, rtol=0, msg=name)
