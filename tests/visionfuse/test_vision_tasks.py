import random

import numpy as np
import pytest

from engine.evaluate.tasks import is_heldout
from engine.evaluate.vision_tasks import (BOTTOM_VIEW, CANVAS_H, TOP_VIEW, VISION_TASKS, ImageView,
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


def test_views_fold_their_band_and_scale_to_minus_one_one():
    images = np.stack([img for img, _ in heldout_images(4)])
    top, bottom = TOP_VIEW.pixel_values(images), BOTTOM_VIEW.pixel_values(images)
    assert tuple(top.shape) == (4, 1, 12, 12)
    for view, rows in ((top, slice(0, 6)), (bottom, slice(6, 12))):
        band = (images[:, rows, :] - 0.5) / 0.5
        # columns 0-11 of the band on top of columns 12-23
        np.testing.assert_allclose(view[:, 0, :6].numpy(), band[:, :, :12])
        np.testing.assert_allclose(view[:, 0, 6:].numpy(), band[:, :, 12:])
    with pytest.raises(ValueError):
        ImageView.from_dict({"y0": 3, "y1": CANVAS_H})


def test_with_patch_6_each_visual_patch_is_one_letter_slice():
    """Folded, the 6 x 6 patch i (row-major) is the band's columns [6i, 6i + 6): letter i."""
    image = render("abcd", random.Random(5))
    square = TOP_VIEW.pixel_values(image[None])[0, 0].numpy()
    patches = [square[:6, :6], square[:6, 6:], square[6:, :6], square[6:, 6:]]
    for i, patch in enumerate(patches):
        np.testing.assert_allclose(patch, (image[:6, 6 * i:6 * i + 6] - 0.5) / 0.5)


def test_the_two_bands_hold_every_glyph_row_between_them():
    """Whatever the vertical offset, top band + bottom band = the whole glyph (7 rows), and
    each band holds 2 to 5 of them."""
    for seed in range(40):
        clean = render("hhhh", random.Random(seed)) > 0.5
        lit = clean.any(axis=1)
        top, bottom = int(lit[:6].sum()), int(lit[6:].sum())
        assert top + bottom == 7 and 2 <= top <= 5


def test_vrev_answer_is_reversed():
    assert VISION_TASKS["vrev"].answer("abcd") == "dcba"
    assert VISION_TASKS["ocr"].answer("abcd") == "abcd"
