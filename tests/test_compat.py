"""Compatibility report on header-only data: each rule on its own, then everything at once."""

from __future__ import annotations

import pytest
import torch

from engine.compat import CompatReport, compatibility_report, is_tied, require_compatible, vocab_size
from engine.errors import IncompatibleModelsError
from engine.io import ModelFolder
from tests.io.builders import TINY_CONFIG, tiny_tensors, write_model


def _model(tmp_path, name, tensors=None, **config_changes):
    config = {**TINY_CONFIG, **config_changes}
    return ModelFolder(write_model(tmp_path / name, tensors or tiny_tensors(seed=len(name)), config))


def test_identical_family_is_ok(tmp_path):
    base = _model(tmp_path, "base")
    fts = [_model(tmp_path, "ft1"), _model(tmp_path, "ft2")]
    report = compatibility_report(base, fts)
    assert isinstance(report, CompatReport)
    assert report.ok and report.errors == [] and report.warnings == []
    assert report.info["vocab"]["target"] == 12 and report.info["arithmetic_dtype"] == "float32"
    assert require_compatible(base, fts).ok


def test_mixed_dtypes_are_info_not_errors(tmp_path):
    base = _model(tmp_path, "base", tiny_tensors(torch.bfloat16))
    ft = _model(tmp_path, "ft", tiny_tensors(torch.float32))
    report = compatibility_report(base, [ft])
    assert report.ok and report.info["mixed_dtypes"] is True
    assert report.info["dtypes"][str(base.path)] == ["BF16"]
    assert report.info["dtypes"][str(ft.path)] == ["F32"]


def test_every_shape_mismatch_listed(tmp_path):
    base = _model(tmp_path, "base")
    tensors = tiny_tensors()
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(20, 8)
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(16, 9)
    ft = _model(tmp_path, "ft", tensors)
    report = compatibility_report(base, [ft])
    assert not report.ok
    assert report.info["shape_mismatches"][str(ft.path)] == [
        "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    assert any("(20, 8) != base (16, 8)" in e for e in report.errors)
    assert any("(16, 9) != base (16, 8)" in e for e in report.errors)


def test_tied_model_without_head_is_not_missing(tmp_path):
    base = _model(tmp_path, "base", tiny_tensors(head=False), tie_word_embeddings=True)
    ft = _model(tmp_path, "ft", tiny_tensors(head=False), tie_word_embeddings=True)
    assert is_tied(base)
    report = compatibility_report(base, [ft])
    assert report.ok and report.info["missing_tensors"][str(ft.path)] == []


def test_tie_inferred_when_config_is_silent(tmp_path):
    config = {k: v for k, v in TINY_CONFIG.items() if k != "tie_word_embeddings"}
    tied = ModelFolder(write_model(tmp_path / "t", tiny_tensors(head=False), config))
    untied = ModelFolder(write_model(tmp_path / "u", tiny_tensors(), config))
    assert is_tied(tied) and not is_tied(untied)


def test_untied_base_tied_finetune_is_a_warning(tmp_path):
    base = _model(tmp_path, "base")
    ft = _model(tmp_path, "ft", tiny_tensors(head=False), tie_word_embeddings=True)
    report = compatibility_report(base, [ft])
    assert report.ok
    assert any("ties lm_head.weight" in w for w in report.warnings)


def test_vocab_policies(tmp_path):
    base = _model(tmp_path, "base")
    ft = _model(tmp_path, "ft", tiny_tensors(vocab=14), vocab_size=14)
    assert vocab_size(base) == 12 and vocab_size(ft) == 14
    refused = compatibility_report(base, [ft])
    assert not refused.ok and len(refused.errors) == 1 and "vocab size 14" in refused.errors[0]
    truncate = compatibility_report(base, [ft], vocab_policy="truncate")
    assert truncate.ok and truncate.info["vocab"]["target"] == 12
    small = _model(tmp_path, "small", tiny_tensors(vocab=10), vocab_size=10)
    assert compatibility_report(base, [ft, small], vocab_policy="truncate").info["vocab"]["target"] == 10
    padded = compatibility_report(base, [ft, small], vocab_policy="pad_from_base")
    assert padded.ok and padded.info["vocab"]["target"] == 12
    assert padded.info["vocab"]["finetunes"] == {str(ft.path): 14, str(small.path): 10}
    with pytest.raises(ValueError):
        compatibility_report(base, [ft], vocab_policy="guess")


def test_extra_and_missing_tensors(tmp_path):
    base = _model(tmp_path, "base")
    tensors = tiny_tensors()
    tensors["score.weight"] = torch.zeros(2, 8)  # leftover classification head
    del tensors["model.layers.1.input_layernorm.weight"]
    ft = _model(tmp_path, "ft", tensors)
    report = compatibility_report(base, [ft])
    assert report.info["extra_tensors"][str(ft.path)] == ["score.weight"]
    assert report.info["missing_tensors"][str(ft.path)] == ["model.layers.1.input_layernorm.weight"]
    assert any("score.weight" in w for w in report.warnings)
    assert not report.ok and any("model.layers.1.input_layernorm.weight" in e for e in report.errors)


def test_architecture_mismatch_and_expert_override(tmp_path):
    base = _model(tmp_path, "base")
    ft = _model(tmp_path, "ft", architectures=["MistralForCausalLM"], model_type="mistral")
    assert not compatibility_report(base, [ft]).ok
    override = compatibility_report(base, [ft], allow_architecture_mismatch=True)
    assert override.ok and any("expert override" in w for w in override.warnings)


def test_structural_config_difference_without_shape_change(tmp_path):
    base = _model(tmp_path, "base")
    ft = _model(tmp_path, "ft", num_attention_heads=4)  # same tensors, other attention split
    report = compatibility_report(base, [ft])
    assert not report.ok and "num_attention_heads = 4" in report.errors[0]


def test_require_compatible_lists_all_reasons(tmp_path):
    base = _model(tmp_path, "base")
    tensors = tiny_tensors(vocab=14)
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(8, 4)
    del tensors["model.norm.weight"]
    ft = _model(tmp_path, "ft", tensors, vocab_size=14, model_type="mistral")
    with pytest.raises(IncompatibleModelsError) as info:
        require_compatible(base, [ft])
    reasons = info.value.reasons
    assert len(reasons) == 4
    joined = " | ".join(reasons)
    for needle in ("architecture", "vocab size 14", "q_proj", "model.norm.weight"):
        assert needle in joined
    assert "4 incompatibilities" in str(info.value)
