"""The repair pipeline end to end on the quick zoo's safety pair: every method writes a folder
transformers loads, with a manifest and a card; the layer-by-layer statistics agree with the
project's full-forward Gram matrices; the policies for untouched tensors hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.io import ModelFolder
from engine.repair.run import repair


@pytest.fixture(scope="module")
def pair(quick_zoo):
    root = Path(quick_zoo)
    return {"aligned": root / "safety/aligned", "erased": root / "safety/erased",
            "base": root / "small/base"}


def tensors(path) -> dict[str, torch.Tensor]:
    with ModelFolder(path) as folder:
        return {n: folder.read_tensor(n).clone() for n in folder.tensor_names}


CASES = [("safe_delta", {"budget": "fraction", "s": 0.2}), ("irr", {"safety_vector": "alignment_delta"}),
         ("resta", {"safety_vector": "alignment_delta", "beta": 0.5}), ("delta_scale", {"alpha": 0.3}),
         ("random_mask", {"keep_share": 0.25})]


@pytest.mark.parametrize("method,params", CASES, ids=[c[0] for c in CASES])
def test_every_method_writes_a_loadable_model_with_manifest_and_card(tmp_path, pair, method, params):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    result = repair(pair["aligned"], pair["erased"], out, method, params, unaligned=pair["base"],
                    device="cpu")
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)
    logits = model(input_ids=torch.tensor([[1, 5, 6, 7]])).logits
    assert torch.isfinite(logits).all()
    manifest = json.loads((out / "delta_workbench_manifest.json").read_text())
    assert manifest["repair"]["method"] == method
    assert set(manifest["repair"]["fingerprints"]) >= {"aligned", "finetuned"}
    assert manifest["repair"]["report"] == json.loads(json.dumps(result.report))
    assert "safety-repair" in (out / "README.md").read_text()
    assert (out / "tokenizer.json").is_file()


def test_safe_delta_takes_non_linear_tensors_from_the_aligned_model(tmp_path, pair):
    result = repair(pair["aligned"], pair["erased"], tmp_path / "o", "safe_delta",
                    {"budget": "fraction", "s": 0.3}, device="cpu")
    out, a, f = tensors(tmp_path / "o"), tensors(pair["aligned"]), tensors(pair["erased"])
    repaired = set(result.report)
    assert len(repaired) == 14 and all(".layers." in n for n in repaired)
    for name in out:
        if name not in repaired:
            assert torch.equal(out[name], a[name]), name
    q = "model.layers.0.self_attn.q_proj.weight"
    kept = (out[q] == f[q]) & (f[q] != a[q])
    assert kept.float().mean() >= result.report[q]["kept_share"] - 1e-6
    assert result.report[q]["safety_cost_after"] < result.report[q]["safety_cost_full_delta"]


def test_safe_delta_at_s_zero_is_the_aligned_model(tmp_path, pair):
    repair(pair["aligned"], pair["erased"], tmp_path / "o", "safe_delta",
           {"budget": "fraction", "s": 0.0}, device="cpu")
    out, a = tensors(tmp_path / "o"), tensors(pair["aligned"])
    assert all(torch.equal(out[n], a[n]) for n in out)


def test_irr_keeping_every_conflict_is_the_finetune(tmp_path, pair):
    repair(pair["aligned"], pair["erased"], tmp_path / "o", "irr",
           {"keep_conflicting": 1.0, "safety_vector": "alignment_delta"}, unaligned=pair["base"],
           device="cpu")
    out, f = tensors(tmp_path / "o"), tensors(pair["erased"])
    assert all(torch.equal(out[n], f[n]) for n in out)


def test_irr_removes_and_reports_per_matrix(tmp_path, pair, monkeypatch):
    monkeypatch.setenv("DELTA_WORKBENCH_HOME", str(tmp_path / "home"))
    result = repair(pair["aligned"], pair["erased"], tmp_path / "o", "irr",
                    {"safety_vector": "alignment_delta", "targets": "qv"}, unaligned=pair["base"],
                    device="cpu")
    assert sorted(result.report) == sorted(f"model.layers.{i}.self_attn.{m}_proj.weight"
                                           for i in range(2) for m in "qv")
    for r in result.report.values():
        assert 0 < r["removed_share"] <= r["conflict_share"] + 0.2
        assert r["task_drift_after"] <= r["task_drift_plain_removal"]
    scratch = tmp_path / "home" / "scratch"  # the spilled Fisher is gone
    assert not scratch.exists() or not any(scratch.iterdir())


def test_layerwise_hessians_equal_the_full_forward_gram_matrices(pair):
    from engine.evaluate.loading import load_model_folder
    from engine.merge.calibration import calibration_examples, encode
    from engine.merge.fisher_gram import gram_matrices
    from engine.repair.layerwise import (decoder_layers, first_layer_inputs, layer_hessians,
                                         linear_modules, run_layer)

    model, tok = load_model_folder(pair["aligned"])
    encoded = encode(tok, calibration_examples("refuse", 12, 0))
    grams = gram_matrices(model, encoded, pad_id=tok.pad_token_id, batch_size=5)
    tokens = sum(len(ids) for ids, _ in encoded)
    prefix, layers = decoder_layers(model)
    inputs = first_layer_inputs(model, [ids for ids, _ in encoded])
    for i, layer in enumerate(layers):
        hessians = layer_hessians(layer, inputs, linear_modules(layer, f"{prefix}.{i}"))
        for name, h in hessians.items():
            expected = grams[name][0] * (2.0 * tokens / len(encoded))
            torch.testing.assert_close(h, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
        inputs = run_layer(layer, inputs)


def test_random_mask_matches_a_reference_manifest(tmp_path, pair):
    ref = repair(pair["aligned"], pair["erased"], tmp_path / "ref", "safe_delta",
                 {"budget": "fraction", "s": 0.2}, device="cpu")
    result = repair(pair["aligned"], pair["erased"], tmp_path / "rnd", "random_mask",
                    {"match_manifest": str(tmp_path / "ref/delta_workbench_manifest.json")},
                    device="cpu")
    with ModelFolder(pair["aligned"]) as folder:
        for name, r in ref.report.items():
            numel = folder.info(name).numel
            assert result.report[name]["kept_share"] == round(r["kept_share"] * numel) / numel


def test_safe_delta_all_linears_repairs_the_untied_head_too(tmp_path, pair):
    result = repair(pair["aligned"], pair["erased"], tmp_path / "o", "safe_delta",
                    {"budget": "fraction", "s": 0.3, "tensors": "all_linears"}, device="cpu")
    assert "lm_head.weight" in result.report and len(result.report) == 15
    assert 0 < result.report["lm_head.weight"]["kept_share"] < 1
