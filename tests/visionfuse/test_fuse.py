import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.errors import ParameterError


def _member(path):
    from engine.visionfuse.members import open_member

    return open_member(path)


def test_placeholder_path_equals_llava_forward(members):
    """Our [bos; visual; text] embeddings give the logits LlavaForConditionalGeneration gives
    for the same prompt with image placeholders and pixel values."""
    from engine.evaluate.tokenizer import BOS_ID, encode_chars
    from engine.evaluate.vision_scoring import IMAGE_TOKEN_ID, prompt_embeds
    from engine.evaluate.vision_tasks import heldout_images
    from engine.zoo.mllm import streams_of

    m = _member(members["top"])
    images = np.stack([img for img, _ in heldout_images(3)])
    n = m.model.config.image_seq_length
    ids = torch.tensor([[BOS_ID] + [IMAGE_TOKEN_ID] * n + encode_chars("ocr:=")] * 3)
    with torch.no_grad():
        ref = m.model(input_ids=ids, pixel_values=m.view.pixel_values(images)).logits
        ours = m.model(inputs_embeds=prompt_embeds(m.model, streams_of(m.model, m.view), images,
                                                   "ocr:=")).logits
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_zero_weights_reproduce_the_base_one_is_the_sum_and_the_default_the_mean(members):
    from engine.visionfuse.fuse import merge_language_models, open_inputs

    _, base, ms = open_inputs(members["base"], [members["top"], members["bottom"]])
    zero = merge_language_models(base, ms, weights=[0.0, 0.0])
    for k in base:
        torch.testing.assert_close(zero[k], base[k], rtol=0, atol=0)
    one = merge_language_models(base, ms, weights=[1.0, 1.0])
    a, b = ms[0].lm_state, ms[1].lm_state
    for k in base:
        want = (base[k].double() + (a[k].double() - base[k].double())
                + (b[k].double() - base[k].double())).float()
        torch.testing.assert_close(one[k], want, rtol=1e-6, atol=1e-6)
    mean = merge_language_models(base, ms)  # the default: lambda 1/k each
    for k in base:
        want = (base[k].double() + 0.5 * (a[k].double() - base[k].double())
                + 0.5 * (b[k].double() - base[k].double())).float()
        torch.testing.assert_close(mean[k], want, rtol=1e-6, atol=1e-6)
    # the members' LMs did move (otherwise the test above proves nothing)
    assert any(not torch.equal(a[k], base[k]) for k in base)


def test_bundle_round_trip_and_token_order(members, tmp_path):
    from engine.evaluate.vision_tasks import heldout_images
    from engine.visionfuse import fuse, load
    from engine.visionfuse.bundle import encoder_parts
    from engine.evaluate.vision_scoring import prompt_embeds

    out = tmp_path / "fused"
    summary = fuse(members["base"], [members["top"], members["bottom"]], out)
    top, bottom = _member(members["top"]), _member(members["bottom"])
    assert summary["visual_tokens"] == 16 + 9
    manifest = json.loads((out / "visionfuse.json").read_text())
    assert [e["source"] for e in manifest["encoders"]] == ["top", "bottom"]
    fused = load(out)
    for stream, m in zip(fused.streams, (top, bottom)):
        parts = encoder_parts(m.model)
        own = {**{"vision_tower." + k: v for k, v in stream.vision_tower.state_dict().items()},
               **{"multi_modal_projector." + k: v for k, v in stream.projector.state_dict().items()}}
        assert set(own) == set(parts)
        assert all(torch.equal(own[k], parts[k]) for k in parts)
        assert stream.view == m.view
    images = np.stack([img for img, _ in heldout_images(2)])
    with torch.no_grad():
        emb = prompt_embeds(fused.lm, fused.streams, images, "ocr:=")
        assert emb.shape[1] == 1 + 16 + 9 + 5
        torch.testing.assert_close(emb[:, 1:17], fused.streams[0].tokens(images))
        torch.testing.assert_close(emb[:, 17:26], fused.streams[1].tokens(images))


def test_one_stream_of_an_unmerged_lm_scores_as_the_member(members, tmp_path):
    """Fused with weights (1, 0) and only the first encoder's tokens kept is member top."""
    from engine.visionfuse import fuse, load
    from engine.visionfuse.evaluate import evaluate_multimodal

    out = tmp_path / "fused10"
    fuse(members["base"], [members["top"], members["bottom"]], out, weights=[1.0, 0.0])
    fused = load(out)
    got = fused.score(["ocr"], 16, keep=[True, False], with_predictions=16)["tasks"]["ocr"]
    want = evaluate_multimodal(members["top"], ["ocr"], 16, with_predictions=16)["tasks"]["ocr"]
    assert got["samples"] == want["samples"]
    assert got["modality"] == "vision"


def test_eval_cli_scores_a_fused_folder(members, tmp_path):
    from engine.visionfuse import fuse

    out = tmp_path / "fused_cli"
    fuse(members["base"], [members["top"], members["bottom"]], out, "ties", {"density": 0.5})
    proc = subprocess.run([sys.executable, "-m", "engine", "eval", str(out), "--tasks",
                           "ocr,vrev,reverse", "-n", "8", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    tasks = json.loads(proc.stdout)["tasks"]
    assert tasks["ocr"]["modality"] == "vision" and tasks["vrev"]["modality"] == "vision"
    assert "modality" not in tasks["reverse"] and tasks["ocr"]["n"] == 8


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "engine", *map(str, args)], capture_output=True,
                          text=True, timeout=600)


def test_refusals_name_the_model(members, tmp_path):
    from engine.visionfuse import fuse

    with pytest.raises(ParameterError, match="'control'.*different LM base"):
        fuse(members["base"], [members["top"], members["control"]], tmp_path / "a")
    with pytest.raises(ParameterError, match="'upper' is text-only"):
        fuse(members["base"], [members["top"], members["text"]], tmp_path / "b")
    with pytest.raises(ParameterError, match="at least two"):
        fuse(members["base"], [members["top"]], tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    proc = _cli("visionfuse", "--base", members["base"], "--models", members["top"],
                members["control"], "--out", tmp_path / "d")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "'control'" in proc.stderr
    proc = _cli("eval", members["text"], "--tasks", "ocr")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "'upper' is text-only" in proc.stderr and "'ocr'" in proc.stderr


def test_vocabulary_mismatch_is_refused(members, tmp_path):
    from engine.visionfuse.members import check_member, open_member, read_base

    config, state = read_base(members["base"])
    m = open_member(members["top"])
    with pytest.raises(ParameterError, match="'top' has vocabulary size"):
        check_member(m, {**config, "vocab_size": config["vocab_size"] + 1}, state,
                     Path(members["base"]))


def test_non_empty_destination_is_refused(members, tmp_path):
    from engine.errors import ExportError
    from engine.visionfuse import fuse

    out = tmp_path / "full"
    out.mkdir()
    (out / "x").write_text("keep")
    with pytest.raises(ExportError):
        fuse(members["base"], [members["top"], members["bottom"]], out)
    assert (out / "x").read_text() == "keep"
