import torch


def test_member_loads_with_from_pretrained_and_the_zoo_loader(members):
    from transformers import LlavaForConditionalGeneration

    from engine.zoo.build import load_trained_model
    from engine.zoo.mllm import load_member

    ours, view = load_member(members["top"])
    hf = LlavaForConditionalGeneration.from_pretrained(members["top"], trust_remote_code=False)
    zoo = load_trained_model(members["top"])  # dispatches on the manifest's family
    assert isinstance(zoo, LlavaForConditionalGeneration)
    a, b, c = ours.state_dict(), hf.state_dict(), zoo.state_dict()
    assert set(a) == set(b) == set(c)
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    assert view.y0 == 0 and view.y1 == 6


def test_lm_state_keeps_the_base_names(members):
    from engine.io import ModelFolder
    from engine.visionfuse.members import open_member

    with ModelFolder(members["base"]) as base:
        names = set(base.tensor_names)
    assert set(open_member(members["bottom"]).lm_state) == names


def test_score_member_reports_vision_modality(members):
    from engine.evaluate.tokenizer import build_tokenizer
    from engine.zoo.mllm import load_member, score_member

    model, view = load_member(members["bottom"])
    scores = score_member(model, view, build_tokenizer(), 4)
    assert scores["tasks"]["ocr"]["modality"] == "vision"
    assert scores["tasks"]["vrev"]["n"] == 4
    assert "reverse" in scores["tasks"] and scores["perplexity"] > 1
