"""extract-lora: the adapter loads in PEFT, and base + adapter is base + the best rank-r
approximation of each linear layer's task vector (checked against an SVD in float64)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from engine.io import ModelFolder
from engine.lora import LoraAdapter
from engine.lora.extract import ExtractOptions, extract_lora, low_rank_factors
from tests.lora.peft_builders import make_adapter, save_merged, tiny_gpt2, tiny_llama


def _finetune(model, folder, seed=3, scale=0.02):
    torch.manual_seed(seed)
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn_like(p), alpha=scale)
    tuned.save_pretrained(folder)
    return tuned


def _best_rank(delta64: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta64, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def test_low_rank_factors_are_eckart_young():
    torch.manual_seed(0)
    d = torch.randn(40, 24)
    a, b, kept, total = low_rank_factors(d, 5)
    assert a.shape == (5, 24) and b.shape == (40, 5)
    torch.testing.assert_close((b @ a).double(), _best_rank(d.double(), 5), atol=1e-5, rtol=0)
    s = torch.linalg.svdvals(d.double())
    assert kept / total == pytest.approx(float((s[:5] ** 2).sum() / (s ** 2).sum()), rel=1e-5)
    assert low_rank_factors(torch.zeros(4, 4), 2) is None
    a, _, _, _ = low_rank_factors(torch.diag(torch.tensor([10.0, 5.0, 0.5, 0.1])), 4, sv_cutoff=0.2)
    assert a.shape[0] == 2   # s_i >= 0.2 * 10 keeps 10 and 5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_extracted_adapter_round_trips_through_peft(tmp_path, arch):
    from peft import PeftModel

    model = (tiny_llama if arch == "llama" else tiny_gpt2)(tmp_path / "base")
    _finetune(model, tmp_path / "ft")
    result = extract_lora(tmp_path / "base", tmp_path / "ft", tmp_path / "lora",
                          ExtractOptions(rank=3))
    assert result.modules > 0 and set(result.ranks.values()) == {3}
    assert 0 < result.kept_energy < 1
    assert any("norm" in w or "ln_" in w for w in result.warnings)  # norms cannot be LoRA
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is (arch == "gpt2")
    assert "extract-lora" in (tmp_path / "lora" / "README.md").read_text()  # the engine's card

    loaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "lora").merge_and_unload()
    merged = loaded.state_dict()
    with ModelFolder(tmp_path / "base") as base, ModelFolder(tmp_path / "ft") as ft:
        checked = 0
        for name in base.tensor_names:
            b = base.get_tensor(name).double()
            module = name.rpartition(".")[0]
            if module in result.ranks and name.endswith(".weight"):
                d = ft.get_tensor(name).double() - b
                conv = arch == "gpt2"
                want = b + (_best_rank(d.T, 3).T if conv else _best_rank(d, 3))
                torch.testing.assert_close(merged[name].double(), want, atol=2e-6, rtol=0, msg=name)
                checked += 1
            else:  # everything the adapter does not carry stays the base's
                assert torch.equal(merged[name], base.get_tensor(name)), name
        assert checked == result.modules
    # and our own adapter reader agrees with PEFT
    with LoraAdapter(tmp_path / "lora") as ours, ModelFolder(tmp_path / "base") as base:
        for name in ours.targets:
            b = base.get_tensor(name)
            torch.testing.assert_close(b.float() + ours.delta(name, b), merged[name].float(),
                                       atol=2e-6, rtol=0)


def test_sv_cutoff_ranks_go_to_rank_pattern_and_peft_honours_them(tmp_path):
    from peft import PeftModel

    model = tiny_llama(tmp_path / "base")
    merged_ref = make_adapter(model, tmp_path / "true_lora", target_modules=["q_proj", "v_proj"],
                              rank_pattern={"v_proj": 2}, r=4)
    save_merged(model, merged_ref, tmp_path / "ft")
    # the fine-tune is exactly rank 4 (q) / rank 2 (v): a tiny cut-off recovers those ranks
    result = extract_lora(tmp_path / "base", tmp_path / "ft", tmp_path / "lora",
                          ExtractOptions(rank=16, sv_cutoff=1e-3))
    for module, r in result.ranks.items():
        assert r == (2 if module.endswith("v_proj") else 4), module
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["r"] in (2, 4) and config["rank_pattern"]
    merged = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "lora").merge_and_unload().state_dict()
    for name, ref in merged_ref.items():
        torch.testing.assert_close(merged[name], ref, atol=5e-6, rtol=0, msg=name)


def test_save_modules_and_embed_lora(tmp_path):
    from peft import PeftModel

    model = tiny_llama(tmp_path / "base")
    tuned = _finetune(model, tmp_path / "ft")
    result = extract_lora(tmp_path / "base", tmp_path / "ft", tmp_path / "lora",
                          ExtractOptions(rank=2, embed_lora=True, save_modules=["lm_head"]))
    assert "model.embed_tokens" in result.ranks
    merged = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "lora").merge_and_unload().state_dict()
    torch.testing.assert_close(merged["lm_head.weight"], tuned.state_dict()["lm_head.weight"])
    with ModelFolder(tmp_path / "base") as base, ModelFolder(tmp_path / "ft") as ft:
        d = ft.get_tensor("model.embed_tokens.weight").double() - base.get_tensor("model.embed_tokens.weight").double()
        want = base.get_tensor("model.embed_tokens.weight").double() + _best_rank(d.T, 2).T
        torch.testing.assert_close(merged["model.embed_tokens.weight"].double(), want, atol=2e-6, rtol=0)
