import random

import numpy as np
import pytest

from engine.evaluate.tasks import is_heldout
from engine.evaluate.vision_tasks import (CANVAS_W, LEFT_VIEW, RIGHT_VIEW, VISION_TASKS, ImageView,
                                          glyph, heldout_images, render, train_images)
from engine.evaluate.tasks import LETTERS


def test_glyphs_are_distinct_and_5x7():
    shapes = {glyph(c).shape for c in LETTERS}
    assert shapes == {(7, 5)}
    assert len({glyph(c).tobytes() for c in LETTERS}) == 26


def test_each_letter_stays_in_its_six_columns():
    rng = random.Random(3)
    for _ in range(20):
        s = "".join(rng.choice(LETTERS) for _ in range(4))
        clean = render(s, random.Random(rng.random()))
        for i, c in enumerate(s):
            cols = clean[:, 6 * i:6 * i + 6] > 0.5
            # the glyph's lit pixels (noise is sigma 0.1: > 0.5 is almost surely ink)
            assert cols.sum() >= glyph(c).sum() - 2


def test_render_refuses_bad_strings():
    with pytest.raises(ValueError):
        render("abc", random.Random(0))
    with pytest.raises(ValueError):
        render("ab1d", random.Random(0))


def test_heldout_is_fixed_and_disjoint_from_train():
    a, b = heldout_images(32, "ocr"), heldout_images(32, "ocr")
    assert [s for _, s in a] == [s for _, s in b]
    assert all(np.array_equal(x, y) for (x, _), (y, _) in zip(a, b))
    assert all(is_heldout(f"image:{s}") for _, s in a)
    stream = train_images(random.Random(0))
    assert not any(is_heldout(f"image:{next(stream)[1]}") for _ in range(200))


def test_views_crop_their_half_and_scale_to_minus_one_one():
    images = np.stack([img for img, _ in heldout_images(4)])
    left, right = LEFT_VIEW.pixel_values(images), RIGHT_VIEW.pixel_values(images)
    assert tuple(left.shape) == (4, 1, 12, 12)
    np.testing.assert_allclose(left[:, 0].numpy(), (images[:, :, :12] - 0.5) / 0.5)
    np.testing.assert_allclose(right[:, 0].numpy(), (images[:, :, 12:] - 0.5) / 0.5)
    with pytest.raises(ValueError):
        ImageView.from_dict({"x0": 5, "x1": CANVAS_W})


def test_vrev_answer_is_reversed():
    assert VISION_TASKS["vrev"].answer("abcd") == "dcba"
    assert VISION_TASKS["ocr"].answer("abcd") == "abcd"
