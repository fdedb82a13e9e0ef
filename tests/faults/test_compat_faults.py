"""reliability.md item 9: incompatible fine-tunes are found before any job, all listed at once."""

from __future__ import annotations

import pytest
import torch

from engine.compat import compatibility_report, require_compatible
from engine.errors import IncompatibleModelsError
from engine.io import ModelFolder
from tests.io.builders import TINY_CONFIG, snapshot, tiny_tensors, write_model


def _model(tmp_path, name, tensors, **config_changes):
    return ModelFolder(write_model(tmp_path / name, tensors, {**TINY_CONFIG, **config_changes}))


def _refused(tmp_path, base, fts, **kw) -> list[str]:
    before = snapshot(tmp_path)
    with pytest.raises(IncompatibleModelsError) as info:
        require_compatible(base, fts, **kw)
    assert info.value.reasons and all(r in str(info.value) for r in info.value.reasons)
    assert snapshot(tmp_path) == before
    return info.value.reasons


def test_one_layer_with_another_hidden_size(tmp_path):
    base = _model(tmp_path, "base", tiny_tensors())
    tensors = tiny_tensors()
    tensors["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(10, 10)
    tensors["model.layers.1.input_layernorm.weight"] = torch.zeros(10)
    ft = _model(tmp_path, "ft", tensors)
    reasons = _refused(tmp_path, base, [ft])
    assert len(reasons) == 2 and all(str(ft.path) in r for r in reasons)
    joined = " | ".join(reasons)
    assert "'model.layers.1.self_attn.q_proj.weight' shape (10, 10) != base (8, 8)" in joined
    assert "'model.layers.1.input_layernorm.weight' shape (10,) != base (8,)" in joined


def test_different_architectures_refused_unless_expert_override(tmp_path):
    base = _model(tmp_path, "base", tiny_tensors())
    ft = _model(tmp_path, "ft", tiny_tensors(), architectures=["GPT2LMHeadModel"], model_type="gpt2")
    reasons = _refused(tmp_path, base, [ft])
    assert "GPT2LMHeadModel" in reasons[0] and "LlamaForCausalLM" in reasons[0]
    assert require_compatible(base, [ft], allow_architecture_mismatch=True).warnings


def test_different_vocab_sizes_need_an_explicit_choice(tmp_path):
    base = _model(tmp_path, "base", tiny_tensors())
    ft = _model(tmp_path, "ft", tiny_tensors(vocab=16), vocab_size=16)
    reasons = _refused(tmp_path, base, [ft])
    assert reasons == [f"{ft.path}: vocab size 16 differs from base 12 (choose truncate or pad_from_base to proceed)"]
    for policy, target in (("truncate", 12), ("pad_from_base", 12)):
        report = require_compatible(base, [ft], vocab_policy=policy)
        assert report.info["vocab"] == {"policy": policy, "base": 12, "finetunes": {str(ft.path): 16},
                                        "target": target}


def test_tied_embeddings_without_lm_head_are_not_missing(tmp_path):
    base = _model(tmp_path, "base", tiny_tensors(head=False), tie_word_embeddings=True)
    ft = _model(tmp_path, "ft", tiny_tensors(head=False), tie_word_embeddings=True)
    report = require_compatible(base, [ft])
    assert report.ok and not any("lm_head" in m for m in report.errors + report.warnings)


def test_extra_tensor_reported_not_fatal(tmp_path):
    base = _model(tmp_path, "base", tiny_tensors())
    tensors = tiny_tensors()
    tensors["classifier.weight"] = torch.zeros(3, 8)
    ft = _model(tmp_path, "ft", tensors)
    report = require_compatible(base, [ft])
    assert any("classifier.weight" in w and str(ft.path) in w for w in report.warnings)


def test_mixed_dtypes_handled(tmp_path):
    base = _model(tmp_path, "base", tiny_tensors(torch.float16))
    ft = _model(tmp_path, "ft", tiny_tensors(torch.bfloat16))
    report = require_compatible(base, [ft])
    assert report.ok and report.info["mixed_dtypes"] and report.info["arithmetic_dtype"] == "float32"


def test_all_problems_of_all_finetunes_at_once(tmp_path):
    base = _model(tmp_path, "base", tiny_tensors())
    a = tiny_tensors()
    a["model.layers.0.mlp.up_proj.weight"] = torch.zeros(12, 8)
    del a["model.norm.weight"]
    b = tiny_tensors(vocab=20)
    ft_a = _model(tmp_path, "a", a)
    ft_b = _model(tmp_path, "b", b, vocab_size=20, model_type="qwen2")
    reasons = _refused(tmp_path, base, [ft_a, ft_b])
    assert len(reasons) == 4
    assert sum(str(ft_a.path) + ":" in r for r in reasons) == 2
    assert sum(str(ft_b.path) + ":" in r for r in reasons) == 2


def test_report_without_raising_keeps_everything(tmp_path):
    base = _model(tmp_path, "base", tiny_tensors())
    ft = _model(tmp_path, "ft", tiny_tensors(), hidden_size=9)
    report = compatibility_report(base, [ft])
    assert not report.ok and report.errors == [f"{ft.path}: config hidden_size = 9 differs from base 8"]
