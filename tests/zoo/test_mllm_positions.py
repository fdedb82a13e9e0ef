"""The position-gap augmentation of the LLaVA members' stage 2 (ours, engine.zoo.mllm)."""

import random

from engine.zoo.mllm import gapped_positions


def test_gap_zero_is_the_plain_layout():
    assert gapped_positions(random.Random(0), 4, 14, 0) == list(range(14))


def test_gaps_keep_bos_first_and_both_blocks_contiguous():
    rng = random.Random(1)
    befores, afters = set(), set()
    for _ in range(400):
        pos = gapped_positions(rng, 4, 14, 8)
        assert len(pos) == 14 and pos[0] == 0
        assert all(b > a for a, b in zip(pos, pos[1:]))  # causal order kept
        visual, text = pos[1:5], pos[5:]
        assert visual == list(range(visual[0], visual[0] + 4))
        assert text == list(range(text[0], text[0] + 9))
        befores.add(visual[0] - 1)
        afters.add(text[0] - visual[-1] - 1)
    # both gaps take every value 0..8: symmetric, no slot of a fusion is favoured
    assert befores == afters == set(range(9))


def _tiny_member():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.evaluate.tokenizer import build_tokenizer
    from engine.zoo.mllm import new_member

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=build_tokenizer().vocab_size, hidden_size=32,
                                      intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2,
                                      tie_word_embeddings=False))
    return new_member(lm, 6, 16, 0).eval()


def _batch(gap=0):
    from engine.evaluate.vision_tasks import TOP_VIEW, train_images
    from engine.zoo.mllm import _vision_batch

    return _vision_batch(random.Random(0), train_images(random.Random(1)), {"ocr": 1.0}, 3, 4,
                         TOP_VIEW, gap)


class _Zero(random.Random):
    def randint(self, a, b):
        return a


def test_no_distractors_is_exactly_llavas_own_forward():
    """k = 0 null tokens: the hand-built embeddings give LLaVA's loss (placeholders filled)."""
    import torch

    from engine.evaluate.vision_tasks import TOP_VIEW
    from engine.zoo.mllm import blocks_loss, streams_of, vision_loss

    model = _tiny_member()
    ids, labels, pixels, positions = _batch()
    with torch.no_grad():
        want = vision_loss(model, ids, labels, pixels)
        own = streams_of(model, TOP_VIEW)[0].tokens_of_pixels(pixels)
        have = blocks_loss(model, ids, labels, [own], _Zero(), 8)
        plain = vision_loss(model, ids, labels, pixels, positions)
    torch.testing.assert_close(have, want)
    torch.testing.assert_close(plain, want)  # gap 0 positions = the default ones


def test_distractors_surround_the_block_and_are_never_scored():
    import torch

    from engine.evaluate.vision_tasks import TOP_VIEW
    from engine.zoo.mllm import blocks_prompt, streams_of

    model = _tiny_member()
    ids, labels, pixels, _ = _batch()
    with torch.no_grad():
        visual = streams_of(model, TOP_VIEW)[0].tokens_of_pixels(pixels)
        embeds, k = blocks_prompt(model, ids, [visual], random.Random(4), 8)
        own = model.model.multi_modal_projector(  # LLaVA's features: the last hidden state
            model.model.vision_tower(pixel_values=pixels,  # before SigLIP's post-layernorm
                                     output_hidden_states=True).hidden_states[-1])
    assert embeds.shape[1] == ids.shape[1] + k
    # the member's own 4 tokens appear, contiguous and unchanged, somewhere in each row
    for b in range(ids.shape[0]):
        hits = [s for s in range(1, 2 + k)
                if torch.allclose(embeds[b, s:s + 4], own[b], atol=1e-6)]
        assert len(hits) == 1


def test_lm_lr_scale_zero_leaves_the_language_model_untouched():
    """Stage 2 with lm_lr_scale 0: the encoder and projector move, the LM does not (the scale
    reaches the LM's parameter group only)."""
    import torch

    from engine.evaluate.vision_tasks import TOP_VIEW
    from engine.zoo.mllm import lm_state_of, train_member
    from engine.zoo.train import TrainSpec

    model = _tiny_member()
    lm0 = {k: v.clone() for k, v in lm_state_of(model.state_dict()).items()}
    proj0 = model.model.multi_modal_projector.linear_1.weight.clone()
    spec = TrainSpec(steps=3, lr=1e-2, batch_size=2, mixture={"ocr": 1.0}, warmup=1)
    train_member(model, TOP_VIEW, spec, 1, 1e-2, 0, distractors=2, lm_lr_scale=0.0)
    lm1 = lm_state_of(model.state_dict())
    assert all(torch.equal(lm0[k], lm1[k]) for k in lm0)
    assert not torch.equal(proj0, model.model.multi_modal_projector.linear_1.weight)
