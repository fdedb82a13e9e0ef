"""Vision-task scoring: greedy exact match of a multimodal model on the held-out images.

A multimodal model is seen here as one language model plus an ordered list of visual streams
(``VisualStream``: a vision encoder, its projector and the view of the image it takes). The
prompt's embeddings are ``[<bos>; tokens of stream 1; ...; tokens of stream k; tag text]``:
a LLaVA member has one stream (its placeholder tokens filled with its projected features,
exactly as ``LlavaForConditionalGeneration`` does: tested), a VisionFuse model several.
Every prompt of a task has the same length, so decoding needs no padding; each step reruns
the (short) sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.errors import ParameterError
from engine.evaluate.tokenizer import BOS_ID, EOS_ID, UNK_ID, encode_chars
from engine.evaluate.vision_tasks import (MODALITY, VISION_TASK_NAMES, VISION_TASKS, ImageView,
                                          heldout_images)

IMAGE_TOKEN_ID = UNK_ID  # the placeholder of LLaVA members: never produced by the tokenizer
DEFAULT_N_VISION = 128


@dataclass
class VisualStream:
    """One encoder's path from an image batch to LM-space tokens."""

    vision_tower: torch.nn.Module
    projector: torch.nn.Module
    view: ImageView
    feature_layer: int = -1

    def tokens(self, images: np.ndarray) -> torch.Tensor:
        """``(B, n_tokens, lm_hidden)`` projected visual tokens of ``(B, 12, 24)`` images."""
        device = next(self.projector.parameters()).device
        return self.tokens_of_pixels(self.view.pixel_values(images).to(device))

    def tokens_of_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """The same from the view's ``(B, 1, 12, 12)`` pixel values."""
        out = self.vision_tower(pixel_values=pixels, output_hidden_states=True, return_dict=True)
        return self.projector(out.hidden_states[self.feature_layer])

    @property
    def n_tokens(self) -> int:
        cfg = self.vision_tower.config
        return (cfg.image_size // cfg.patch_size) ** 2


def prompt_embeds(lm, streams: list[VisualStream], images: np.ndarray, text: str,
                  keep: list[bool] | None = None) -> torch.Tensor:
    """``[<bos>; visual tokens of each stream (those ``keep`` marks); text]`` embeddings."""
    embed = lm.get_input_embeddings()
    device = embed.weight.device
    batch = len(images)
    bos = embed(torch.full((batch, 1), BOS_ID, dtype=torch.long, device=device))
    text_ids = torch.tensor([encode_chars(text)] * batch, dtype=torch.long, device=device)
    parts = [bos]
    for i, stream in enumerate(streams):
        if keep is None or keep[i]:
            parts.append(stream.tokens(images).to(bos.dtype))
    parts.append(embed(text_ids))
    return torch.cat(parts, dim=1)


@torch.no_grad()
def greedy_from_embeds(lm, embeds: torch.Tensor, max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations (each cut after its first ``<eos>``, included)."""
    embed = lm.get_input_embeddings()
    out = torch.empty((embeds.shape[0], 0), dtype=torch.long, device=embeds.device)
    for _ in range(max_new_tokens):
        logits = lm(inputs_embeds=embeds, use_cache=False).logits[:, -1]
        nxt = logits.argmax(dim=-1)
        out = torch.cat([out, nxt[:, None]], dim=1)
        embeds = torch.cat([embeds, embed(nxt[:, None]).to(embeds.dtype)], dim=1)
    rows = []
    for row in out.tolist():
        rows.append(row[:row.index(EOS_ID) + 1] if EOS_ID in row else row)
    return rows


def check_vision_tasks(tasks: list[str] | None) -> list[str]:
    names = list(VISION_TASK_NAMES if tasks is None else tasks)
    unknown = [t for t in names if t not in VISION_TASKS]
    if unknown:
        raise ParameterError(f"unknown vision task(s) {unknown}; known: {VISION_TASK_NAMES}")
    return names


@torch.no_grad()
def score_vision(lm, streams: list[VisualStream], tasks: list[str] | None = None,
                 n_per_task: int | None = None, *, keep: list[bool] | None = None,
                 batch_size: int = 256, with_predictions: int = 0) -> dict:
    """``{"tasks": {name: {"accuracy", "char_accuracy", "n", "modality": "vision"}}}``.

    ``char_accuracy``: the share of answer letters right in place (partial credit, which tells
    a model that reads half the image from one that reads none). ``with_predictions``: also
    return the first that many held-out strings with the model's answers (for display)."""
    names = check_vision_tasks(tasks)
    n = DEFAULT_N_VISION if n_per_task is None else int(n_per_task)
    if n < 1:
        raise ParameterError("n_per_task must be >= 1")
    was_training = lm.training
    lm.eval()
    result: dict = {"tasks": {}}
    try:
        for name in names:
            task = VISION_TASKS[name]
            examples = heldout_images(n, name)
            answers = [task.answer(s) for _, s in examples]
            preds: list[str] = []
            for start in range(0, n, batch_size):
                images = np.stack([img for img, _ in examples[start:start + batch_size]])
                embeds = prompt_embeds(lm, streams, images, task.text, keep)
                longest = max(len(a) for a in answers) + 1
                for row in greedy_from_embeds(lm, embeds, longest):
                    preds.append(_decode(row))
            exact = sum(p == a for p, a in zip(preds, answers))
            chars = sum(sum(x == y for x, y in zip(p, a)) for p, a in zip(preds, answers))
            entry = {"accuracy": exact / n, "char_accuracy": chars / sum(len(a) for a in answers),
                     "n": n, "modality": MODALITY}
            if with_predictions:
                entry["samples"] = [{"string": s, "answer": a, "prediction": p}
                                    for (_, s), a, p in list(zip(examples, answers, preds))
                                    [:with_predictions]]
            result["tasks"][name] = entry
    finally:
        lm.train(was_training)
    return result


def _decode(ids: list[int]) -> str:
    from engine.evaluate.tokenizer import VOCAB

    inverse = {i: t for t, i in VOCAB.items()}
    text = [inverse.get(i, "?") for i in ids if i != EOS_ID]
    return "".join(t if len(t) == 1 else "?" for t in text)
