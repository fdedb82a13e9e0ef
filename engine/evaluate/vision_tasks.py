"""Synthetic images and the vision tasks of the zoo's multimodal family (``mllm``).

An image is a 4-letter lowercase string drawn with a built-in 5x7 bitmap font (upper-case
glyphs, one pixel between letters) on a 12 x 24 grayscale canvas, at a random vertical offset
(rows 1-4) and horizontal jitter (0-1 px), plus Gaussian noise (sigma 0.1), clipped to [0, 1].
Letter i always lies in columns [6i, 6i + 6); the glyphs span rows top..top + 6, top in 1-4.

Tasks (the prompt is ``<bos>`` + the image's tokens + the tag text; scored by exact match):

- ``ocr``: ``ocr:=`` -> the string;
- ``vrev``: ``vrv:=`` -> the string reversed (perception plus the LM's pretrained REV skill).

A member of the family sees the image through its **view** (``ImageView``): a band of rows
across the whole width (the top or the bottom half of the canvas), so each member sees a slice
of every letter. With the vertical offset, the top band holds 5, 4, 3 or 2 of a glyph's 7 rows
and the bottom band the rest: a member alone reads the string of some images, the two bands
together always hold every glyph whole.
Train and held-out images are split on the string with the zoo's ``is_heldout`` (both tasks
share the split); held-out sets come from fixed seeds, the same on every machine.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from engine.evaluate.tasks import LETTERS, is_heldout

N_LETTERS = 4
GLYPH_W, GLYPH_H, PITCH = 5, 7, 6
CANVAS_H, CANVAS_W = 12, PITCH * N_LETTERS  # 12 x 24
NOISE_SIGMA = 0.1
MODALITY = "vision"

# 5x7 glyphs, one hex byte per row, bit 4 = leftmost pixel (upper-case shapes of a..z)
_FONT_HEX = {
    "a": "0E 11 11 1F 11 11 11", "b": "1E 11 11 1E 11 11 1E", "c": "0E 11 10 10 10 11 0E",
    "d": "1C 12 11 11 11 12 1C", "e": "1F 10 10 1E 10 10 1F", "f": "1F 10 10 1E 10 10 10",
    "g": "0E 11 10 17 11 11 0F", "h": "11 11 11 1F 11 11 11", "i": "0E 04 04 04 04 04 0E",
    "j": "07 02 02 02 02 12 0C", "k": "11 12 14 18 14 12 11", "l": "10 10 10 10 10 10 1F",
    "m": "11 1B 15 15 11 11 11", "n": "11 11 19 15 13 11 11", "o": "0E 11 11 11 11 11 0E",
    "p": "1E 11 11 1E 10 10 10", "q": "0E 11 11 11 15 12 0D", "r": "1E 11 11 1E 14 12 11",
    "s": "0F 10 10 0E 01 01 1E", "t": "1F 04 04 04 04 04 04", "u": "11 11 11 11 11 11 0E",
    "v": "11 11 11 11 11 0A 04", "w": "11 11 11 15 15 15 0A", "x": "11 11 0A 04 0A 11 11",
    "y": "11 11 11 0A 04 04 04", "z": "1F 01 02 04 08 10 1F",
}


def glyph(letter: str) -> np.ndarray:
    """The 7 x 5 {0, 1} bitmap of a lowercase letter."""
    rows = [int(h, 16) for h in _FONT_HEX[letter].split()]
    return np.array([[(r >> (GLYPH_W - 1 - c)) & 1 for c in range(GLYPH_W)] for r in rows],
                    dtype=np.float32)


def render(text: str, rng: random.Random) -> np.ndarray:
    """The noisy 12 x 24 float32 image of a 4-letter string (values in [0, 1])."""
    if len(text) != N_LETTERS or any(c not in _FONT_HEX for c in text):
        raise ValueError(f"render takes {N_LETTERS} lowercase letters, got {text!r}")
    image = np.zeros((CANVAS_H, CANVAS_W), dtype=np.float32)
    top = 1 + rng.randint(0, CANVAS_H - GLYPH_H - 2)  # rows 1-4: a blank row above and below
    jitter = rng.randint(0, PITCH - GLYPH_W)  # 0 or 1: letter i stays inside [6i, 6i + 6)
    for i, letter in enumerate(text):
        x = PITCH * i + jitter
        image[top:top + GLYPH_H, x:x + GLYPH_W] = glyph(letter)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, NOISE_SIGMA, image.shape)
    return np.clip(image + noise.astype(np.float32), 0.0, 1.0)


@dataclass(frozen=True)
class ImageView:
    """How one member's encoder sees the canvas: the band of rows [y0, y1) across the whole
    width (half the canvas: y1 - y0 == 6), folded into a 12 x 12 square (columns 0-11 on top of
    columns 12-23), scaled to [-1, 1] (``(v - 0.5) / 0.5``), one channel. Folded, each 6 x 6
    patch holds one letter's slice: with patch 6, visual token i is letter i.

    A band sees a slice of *every* letter (ours: complementary views that carry the same kind
    of evidence about each letter, so a member alone reads whole strings sometimes and the
    fused model can pool the two slices of each letter)."""

    y0: int
    y1: int

    def to_dict(self) -> dict:
        return {"y0": self.y0, "y1": self.y1, "canvas": [CANVAS_H, CANVAS_W]}

    @classmethod
    def from_dict(cls, raw: dict) -> "ImageView":
        view = cls(int(raw["y0"]), int(raw["y1"]))
        if not (0 <= view.y0 < view.y1 <= CANVAS_H) or view.y1 - view.y0 != BAND_H:
            raise ValueError(f"image view rows [{view.y0}, {view.y1}) are not a {BAND_H}-row "
                             f"band inside the {CANVAS_H}-row canvas")
        return view

    def pixel_values(self, images: np.ndarray):
        """``(B, 1, 12, 12)`` float32 torch tensor of a batch ``(B, 12, 24)`` of images."""
        import torch

        band = np.asarray(images, dtype=np.float32)[:, self.y0:self.y1, :]
        half = CANVAS_W // 2
        square = np.concatenate([band[:, :, :half], band[:, :, half:]], axis=1)
        return torch.from_numpy((square - 0.5) / 0.5).unsqueeze(1).contiguous()


BAND_H = CANVAS_H // 2
TOP_VIEW = ImageView(0, BAND_H)  # rows 0-5: the glyphs' top 2-5 rows (by the vertical offset)
BOTTOM_VIEW = ImageView(BAND_H, CANVAS_H)  # rows 6-11: the remaining 5-2 rows


@dataclass(frozen=True)
class VisionTask:
    name: str
    tag: str
    description: str

    @property
    def text(self) -> str:
        return f"{self.tag}:="

    def answer(self, string: str) -> str:
        return string[::-1] if self.name == "vrev" else string


VISION_TASKS: dict[str, VisionTask] = {
    "ocr": VisionTask("ocr", "ocr", "read the 4-letter string in the image"),
    "vrev": VisionTask("vrev", "vrv", "the image's 4-letter string, reversed"),
}
VISION_TASK_NAMES = list(VISION_TASKS)

VisionExample = tuple[np.ndarray, str]  # (image, the string drawn)


def _string(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(N_LETTERS))


def _split_key(string: str) -> str:
    return f"image:{string}"


def train_images(rng: random.Random) -> Iterator[VisionExample]:
    """Endless training images (train split strings only)."""
    while True:
        string = _string(rng)
        if not is_heldout(_split_key(string)):
            yield render(string, rng), string


def heldout_images(n: int, task: str = "ocr") -> list[VisionExample]:
    """The first ``n`` distinct held-out images of a task, the same on every machine."""
    seed = int.from_bytes(hashlib.sha256(f"heldout:vision:{task}".encode()).digest()[:8], "big")
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        string = _string(rng)
        if is_heldout(_split_key(string)) and string not in seen:
            seen.add(string)
            out.append((render(string, rng), string))
    return out
