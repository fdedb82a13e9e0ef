"""The letter anchor, the two-rendering batches and the family data seed of the LLaVA
members' training (ours, engine.zoo.mllm)."""

import random

import pytest
import torch

from tests.zoo.test_mllm_positions import _Zero, _tiny_member


def _strings_batch():
    from engine.evaluate.vision_tasks import TOP_VIEW, train_images
    from engine.zoo.mllm import _vision_batch

    return _vision_batch(random.Random(0), train_images(random.Random(1)), {"ocr": 1.0}, 3, 4,
                         TOP_VIEW, 0, with_strings=True)


def test_two_blocks_without_nulls_are_bos_block_block_text():
    from engine.zoo.mllm import blocks_prompt

    model = _tiny_member()
    ids, _, _, _, _ = _strings_batch()
    a, b = torch.randn(3, 4, 32), torch.randn(3, 4, 32)
    with torch.no_grad():
        embeds, extra = blocks_prompt(model, ids, [a, b], _Zero(), 8)
        embed = model.get_input_embeddings()
        want = torch.cat([embed(ids[:, :1]), a, b, embed(ids[:, 5:])], dim=1)
    assert extra == 4
    torch.testing.assert_close(embeds, want)


def test_nulls_fill_the_gaps_and_keep_both_blocks_whole():
    from engine.zoo.mllm import blocks_prompt

    model = _tiny_member()
    ids, _, _, _, _ = _strings_batch()
    a, b = torch.randn(3, 4, 32), torch.randn(3, 4, 32)
    rng = random.Random(7)
    for _ in range(20):
        with torch.no_grad():
            embeds, extra = blocks_prompt(model, ids, [a, b], rng, 4)
        k = extra - 4
        assert 0 <= k <= 4 and embeds.shape[1] == ids.shape[1] + extra
        for r in range(3):
            row = embeds[r]
            at_a = [s for s in range(1, 2 + k) if torch.equal(row[s:s + 4], a[r])]
            at_b = [s for s in range(5, 6 + k) if torch.equal(row[s:s + 4], b[r])]
            assert len(at_a) == 1 and len(at_b) == 1 and at_b[0] >= at_a[0] + 4


def test_two_block_loss_scores_only_the_answer():
    """The extra tokens are never targets: the loss equals a float64 cross-entropy over the
    answer positions alone, computed from the same logits."""
    from engine.zoo.mllm import blocks_loss, blocks_prompt
    from engine.zoo.train import IGNORE

    model = _tiny_member()
    ids, labels, _, _, _ = _strings_batch()
    a, b = torch.randn(3, 4, 32), torch.randn(3, 4, 32)
    with torch.no_grad():
        torch.manual_seed(5)  # the null tokens' noise
        have = blocks_loss(model, ids, labels, [a, b], random.Random(3), 4)
        torch.manual_seed(5)
        embeds, extra = blocks_prompt(model, ids, [a, b], random.Random(3), 4)
        logits = model(inputs_embeds=embeds).logits.double()
    total, count = 0.0, 0
    answer = [(j, int(labels[r, j])) for r in range(3) for j in range(labels.shape[1])
              if labels[r, j] != IGNORE]
    for r in range(3):
        for j in range(labels.shape[1]):
            if labels[r, j] == IGNORE:
                continue
            logp = torch.log_softmax(logits[r, j + extra - 1], dim=-1)
            total -= float(logp[labels[r, j]])
            count += 1
    assert count == len(answer) > 0
    assert have.item() == pytest.approx(total / count, rel=1e-5)


def test_letter_anchor_is_relative_squared_distance_to_the_letters_embeddings():
    from engine.evaluate.tasks import LETTERS
    from engine.evaluate.tokenizer import encode_chars
    from engine.zoo.mllm import LetterAnchor

    model = _tiny_member()
    anchor = LetterAnchor(model, 4)
    table = model.get_input_embeddings().weight.detach().double()
    scale = sum(float(table[i].pow(2).sum()) for i in encode_chars(LETTERS)) / len(LETTERS)
    strings = ["abcd", "zzyx"]
    exact = torch.stack([table[encode_chars(s)] for s in strings]).float()
    assert anchor.loss(exact, strings).item() == pytest.approx(0.0, abs=1e-6)
    tokens = torch.randn(2, 4, 32)
    want = sum(float((tokens[b, i].double() - table[encode_chars(s)[i]]).pow(2).sum())
               for b, s in enumerate(strings) for i in range(4)) / 8 / scale
    assert anchor.loss(tokens, strings).item() == pytest.approx(want, rel=1e-5)
    assert anchor.loss(torch.zeros(2, 4, 32), strings).item() == pytest.approx(
        sum(float(table[encode_chars(s)].pow(2).sum()) for s in strings) / 8 / scale, rel=1e-5)


def test_letter_anchor_targets_stay_the_parents_while_the_lm_trains():
    from engine.zoo.mllm import LetterAnchor

    model = _tiny_member()
    anchor = LetterAnchor(model, 4)
    before = anchor.table.clone()
    with torch.no_grad():
        model.get_input_embeddings().weight.add_(1.0)
    assert torch.equal(anchor.table, before)


def test_anchor_needs_one_token_per_letter():
    from engine.errors import ConfigError
    from engine.zoo.mllm import LetterAnchor

    with pytest.raises(ConfigError, match="one visual token per letter"):
        LetterAnchor(_tiny_member(), 9)


def test_second_rendering_refuses_position_gaps():
    from engine.errors import ConfigError
    from engine.evaluate.vision_tasks import TOP_VIEW
    from engine.zoo.mllm import train_member
    from engine.zoo.train import TrainSpec

    spec = TrainSpec(steps=2, lr=1e-2, batch_size=2, mixture={"ocr": 1.0}, warmup=1)
    with pytest.raises(ConfigError, match="do not combine"):
        train_member(_tiny_member(), TOP_VIEW, spec, 1, 1e-2, 0, position_gap=2,
                     second_rendering=0.5)


from engine.zoo.mllm import _vision_batch as _REAL_BATCH  # noqa: E402


def _strings_seen(monkeypatch, seed, data_seed):
    from engine.evaluate.vision_tasks import TOP_VIEW
    from engine.zoo import mllm
    from engine.zoo.train import TrainSpec

    seen, real = [], _REAL_BATCH

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(tuple(out[-1]))
        return out

    monkeypatch.setattr(mllm, "_vision_batch", spy)
    spec = TrainSpec(steps=4, lr=1e-3, batch_size=2, mixture={"ocr": 0.5, "vrev": 0.5}, warmup=1)
    mllm.train_member(_tiny_member(), TOP_VIEW, spec, 2, 1e-3, seed, distractors=2, anchor=1.0,
                      second_rendering=1.0, data_seed=data_seed)
    return seen


def test_family_data_seed_gives_members_the_same_batches(monkeypatch):
    same_a = _strings_seen(monkeypatch, 1, 123)
    same_b = _strings_seen(monkeypatch, 2, 123)
    own_a = _strings_seen(monkeypatch, 1, None)
    own_b = _strings_seen(monkeypatch, 2, None)
    assert same_a == same_b and len(same_a) == 4
    assert own_a != own_b


def test_anchor_and_second_rendering_train_every_part():
    """With the anchor and two renderings on, stage 1 moves the encoder and projector only
    and stage 2 the LM too; the losses are finite."""
    from engine.evaluate.vision_tasks import TOP_VIEW
    from engine.zoo.mllm import lm_state_of, train_member
    from engine.zoo.train import TrainSpec

    model = _tiny_member()
    lm0 = {k: v.clone() for k, v in lm_state_of(model.state_dict()).items()}
    tower0 = model.model.multi_modal_projector.linear_2.weight.clone()
    spec = TrainSpec(steps=3, lr=1e-2, batch_size=2, mixture={"ocr": 1.0}, warmup=1)
    losses = train_member(model, TOP_VIEW, spec, 3, 1e-2, 0, distractors=2, anchor=1.0,
                          second_rendering=1.0)
    assert all(torch.isfinite(torch.tensor(losses)))
    lm1 = lm_state_of(model.state_dict())
    assert all(torch.equal(lm0[k], lm1[k]) for k in lm0)  # stage 1 only: LM frozen
    assert not torch.equal(
        tower0, model.model.multi_modal_projector.linear_2.weight)
    spec = TrainSpec(steps=4, lr=1e-2, batch_size=2, mixture={"ocr": 1.0}, warmup=1)
    train_member(model, TOP_VIEW, spec, 1, 1e-2, 0, distractors=2, anchor=1.0,
                 second_rendering=1.0)
    lm2 = lm_state_of(model.state_dict())
    assert any(not torch.equal(lm0[k], lm2[k]) for k in lm0)
