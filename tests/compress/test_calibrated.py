"""BitDelta's scale distillation as the authors run it (logit MSE on generic text, AdamW, cosine
lr), our task-KL variant, the DBMS-style scalars, and the fallback of a fine-tune in no zoo."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from engine.__main__ import main
from engine.compress import Artifact, compress, get_method, rebuild_state_dict
from engine.compress import calibration as ccal
from engine.compress.methods import dbms


@pytest.fixture(scope="module")
def zoo_pair(quick_zoo):
    root = Path(quick_zoo) / "small"
    return root / "base", root / "reverse"


@pytest.fixture(scope="module")
def own_pair(zoo_pair, tmp_path_factory):
    """The same two models copied outside any zoo: a user's own base and fine-tune."""
    root = tmp_path_factory.mktemp("own")
    return tuple(Path(shutil.copytree(p, root / p.name)) for p in zoo_pair)


def test_cosine_schedule_is_torchs_reference():
    steps, lr = 7, 1e-4
    optimizer = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    reference = []
    for _ in range(steps):
        reference.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    ours = [ccal.cosine_lr(k, steps, lr) for k in range(steps)]
    assert ours == pytest.approx(reference, rel=1e-12, abs=1e-18)
    assert ours[0] == lr and ours[-1] == pytest.approx(lr * (1 + math.cos(math.pi * 6 / 7)) / 2)


def test_logit_mse_distillation_lowers_the_mse_it_optimises(zoo_pair, tmp_path, monkeypatch):
    base, ft = zoo_pair
    captured: dict = {}
    real = ccal.distill_logit_mse

    def spy(*args, **kwargs):
        captured.update(real(*args, **kwargs))
        return captured

    items_seen: list = []
    real_items = ccal.zoo_pretraining_items

    def items(seed):
        for item in real_items(seed):
            items_seen.append(item)
            yield item

    monkeypatch.setattr(ccal, "distill_logit_mse", spy)
    monkeypatch.setattr(ccal, "zoo_pretraining_items", items)
    result = compress(base, ft, tmp_path / "bd", "bitdelta", ratio=16,
                      params={"steps": 12, "lr": 1e-3}, device="cpu")
    assert captured["mse_after"] < captured["mse_before"]
    assert captured["lrs"] == [ccal.cosine_lr(k, 12, 1e-3) for k in range(12)]
    assert (captured["batch_size"], captured["seq_len"]) == (4, 128)  # the authors' defaults
    report = result.calibration["distill"]
    assert report["mse_after"] == captured["mse_after"] and "lrs" not in report
    # generic text: the bases' pretraining corpus, never the fine-tune's own (lower-case) task
    assert items_seen and not any(text.startswith("rev:") for text, _ in items_seen)
    assert any(text.startswith("REV:") for text, _ in items_seen)
    # the distilled scales are what the artifact holds: another rebuild than stage 1
    compress(base, ft, tmp_path / "s1", "bitdelta", ratio=16, params={"distill": False}, device="cpu")
    a = rebuild_state_dict(tmp_path / "bd", base, device="cpu")
    b = rebuild_state_dict(tmp_path / "s1", base, device="cpu")
    assert any(not torch.equal(a[n], b[n]) for n in a if a[n].ndim == 2)


def test_paper_defaults_and_our_variant_are_named():
    params = get_method("bitdelta").parse_params({}, 16.0)
    assert (params.distill, params.objective, params.steps, params.lr,
            params.batch_size, params.seq_len) == (True, "logit_mse", 200, 1e-4, 4, 128)
    assert get_method("bitdelta").presets["small-models"]["objective"] == "task_kl"
    paper = get_method("dbms").paper
    assert paper.startswith("DBMS-style scalar calibration (ours") and "not the paper's" in paper


def test_blocks_scope_distils_the_block_scales_and_keeps_the_rest(zoo_pair, tmp_path):
    base, ft = zoo_pair
    art = tmp_path / "art"
    result = compress(base, ft, art, "bitdelta", ratio=16,
                      params={"steps": 6, "lr": 1e-3, "scope": "blocks", "ratio_over": "compressed"},
                      device="cpu")
    kept = [n for n, info in result.tensors.items() if "stored" in info]
    assert sorted(kept) == ["lm_head.weight", "model.embed_tokens.weight"]
    assert result.calibration["distill"]["mse_after"] < result.calibration["distill"]["mse_before"]
    rebuilt = rebuild_state_dict(art, base, device="cpu")
    from engine.io import ModelFolder

    with ModelFolder(base) as b, ModelFolder(ft) as f:
        for name in kept:
            w0 = b.get_tensor(name).float()
            assert torch.equal(rebuilt[name], w0 + (f.get_tensor(name).float() - w0).half().float())
    assert abs(result.ratio_compressed / 16 - 1) <= 0.10


def test_dbms_style_rebuild_by_hand():
    """(1 + alpha) W_base + lambda d_hat on a 2 x 2 tensor, worked out by hand."""
    w = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    d_hat = torch.tensor([[0.1, 0.2], [-0.4, 0.0]])
    params = dbms.Params(inner="svd", inner_params={"rank": 1}, alpha=0.5, scale=2.0)
    out = dbms.rebuild(w, d_hat, params, None)
    # 1.5 * w + 2 * d_hat
    assert torch.allclose(out, torch.tensor([[1.7, -2.6], [-0.05, 6.0]]), atol=1e-6)
    unset = dbms.Params(inner="svd", inner_params={"rank": 1})
    assert torch.equal(dbms.rebuild(w, d_hat, unset, None), w + d_hat)  # init: alpha 0, lambda 1


def test_dbms_over_bitdelta_runs_no_distillation_of_its_own():
    params = get_method("dbms").parse_params({"inner": "bitdelta"}, 16.0)
    assert params.inner_params["distill"] is False and params.inner_parsed().distill is False
    from engine.errors import ParameterError

    with pytest.raises(ParameterError, match="inner_params.distill: false"):
        get_method("dbms").parse_params({"inner": "bitdelta", "inner_params": {"distill": True}}, 16.0)


@pytest.mark.parametrize("method,params,needle", [
    ("bitdelta", {"steps": 2}, "distilled on the zoo's synthetic pretraining text"),
    ("bitdelta", {"steps": 2, "objective": "task_kl", "n_prompts": 4}, "every zoo task"),
    ("dbms", {"inner": "svd", "steps": 2, "n_prompts": 4}, "every zoo task"),
])
def test_a_fine_tune_in_no_zoo_falls_back_with_one_warning(own_pair, tmp_path, capsys, method,
                                                            params, needle):
    base, ft = own_pair
    art = tmp_path / "art"
    result = compress(base, ft, art, method, ratio=16, params=params, device="cpu")
    warnings = [w for w in result.warnings if "in no zoo" in w]
    assert len(warnings) == 1 and needle in warnings[0] and "\n" not in warnings[0]
    assert Artifact(art).manifest["calibration_warning"] == warnings[0]
    assert result.calibration["warning"] == warnings[0]
    # the CLI prints it as one line
    args = ["compress", "--base", str(base), "--finetuned", str(ft), "--method", method,
            "--ratio", "16", "--device", "cpu", "--quiet", "--out", str(tmp_path / "cli")]
    for key, value in params.items():
        args += ["--param", f"{key}={value}"]
    assert main(args) == 0
    assert f"warning: {warnings[0]}" in capsys.readouterr().err.splitlines()


def test_a_zoo_fine_tune_gets_no_warning(zoo_pair, tmp_path):
    base, ft = zoo_pair
    result = compress(base, ft, tmp_path / "art", "dbms", ratio=16,
                      params={"inner": "svd", "steps": 2, "n_prompts": 4}, device="cpu")
    assert not any("in no zoo" in w for w in result.warnings)
    assert "calibration_warning" not in json.loads((tmp_path / "art" / "manifest.json").read_text())
