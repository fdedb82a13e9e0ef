"""Analysis of base + LoRA adapter equals analysis of PEFT's merged model, tensor by tensor."""

from __future__ import annotations

import pytest

from engine.analysis.run import analyze
from tests.lora.peft_builders import make_adapter, save_merged, tiny_gpt2, tiny_llama


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adapter_norms_equal_the_merged_delta(tmp_path, arch):
    if arch == "llama":
        model = tiny_llama(tmp_path / "base")
        merged = make_adapter(model, tmp_path / "adapter", target_modules=["q_proj", "v_proj"],
                              modules_to_save=["lm_head"])
    else:
        model = tiny_gpt2(tmp_path / "base")
        merged = make_adapter(model, tmp_path / "adapter", target_modules=["c_attn", "c_proj"],
                              fan_in_fan_out=True)
    save_merged(model, merged, tmp_path / "merged")
    via_adapter = analyze(tmp_path / "base", [tmp_path / "adapter"], with_pairs=False)
    via_merged = analyze(tmp_path / "base", [tmp_path / "merged"], with_pairs=False)
    a = {r["name"]: r for r in via_adapter["tensors"]}
    m = {r["name"]: r for r in via_merged["tensors"]}
    assert set(a) == set(m)
    nonzero = 0
    for name, row in m.items():
        assert a[name]["fro_norm"] == pytest.approx(row["fro_norm"], rel=1e-4, abs=1e-6), name
        nonzero += row["fro_norm"] > 0
    assert nonzero >= 4
    assert via_adapter["finetuned"] == [str((tmp_path / "adapter").resolve())]
