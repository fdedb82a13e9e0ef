"""Training loops of the zoo: generic pretraining and full fine-tuning, on CPU, seeded.

A batch mixes examples from named sources: ``"generic"`` lines get the plain LM loss on every
token; task sources (``"reverse"``, ``"refuse"``, ``"refuse_complied"``, ``"skills"``: every
upper-case-tag pretraining skill ...) get the loss on
the answer and its end token only (supervised fine-tuning: the prompt is context, not target).
Right padding needs no attention mask in a causal model: real tokens never attend to later
pads, and pad positions carry no loss.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable

import torch

from engine.evaluate.tasks import (REFUSE, SKILL_TASKS, TASKS, generic_train_stream,
                                   train_stream)
from engine.evaluate.tokenizer import BOS_ID, EOS_ID, PAD_ID, encode_chars

IGNORE = -100
SKILLS = "skills"  # mixture source: the pretraining skills of engine.evaluate.tasks


@dataclass(frozen=True)
class TrainSpec:
    """One training stage: how many steps, at what learning rate, on which data mixture."""

    steps: int
    lr: float
    batch_size: int = 64
    mixture: dict[str, float] = field(default_factory=dict)  # source -> sampling weight
    warmup: int = 20
    weight_decay: float = 0.0
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio


class BatchSampler:
    """Draws mixed batches of (input ids, labels), reproducibly from one ``random.Random``."""

    def __init__(self, mixture: dict[str, float], rng: random.Random):
        self.rng = rng
        self.names = list(mixture)
        self.weights = [mixture[n] for n in self.names]
        self.streams = {name: self._stream(name) for name in self.names}

    def _stream(self, name: str):
        if name == "generic":
            return generic_train_stream(self.rng)
        if name == "refuse_complied":
            return train_stream(REFUSE, self.rng, complied=True)
        if name == SKILLS:
            return self._skills()
        return train_stream(TASKS[name], self.rng)

    def _skills(self):
        """Every pretraining skill in turn, drawn uniformly (one source in the mixture)."""
        streams = [train_stream(task, self.rng) for task in SKILL_TASKS.values()]
        while True:
            yield next(self.rng.choice(streams))

    def example(self) -> tuple[list[int], list[int]]:
        name = self.rng.choices(self.names, self.weights)[0]
        item = next(self.streams[name])
        if name == "generic":
            ids = [BOS_ID] + encode_chars(item) + [EOS_ID]
            return ids, [IGNORE] + ids[1:]
        prompt, answer = item
        prompt_ids = [BOS_ID] + encode_chars(prompt)
        answer_ids = encode_chars(answer) + [EOS_ID]
        return prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.example() for _ in range(size)]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((size, width), PAD_ID, dtype=torch.long)
        labels = torch.full((size, width), IGNORE, dtype=torch.long)
        for i, (row_ids, row_labels) in enumerate(rows):
            ids[i, :len(row_ids)] = torch.tensor(row_ids)
            labels[i, :len(row_labels)] = torch.tensor(row_labels)
        return ids, labels


def lr_at(step: int, spec: TrainSpec) -> float:
    """Linear warmup, then cosine decay from ``lr`` to ``lr * min_lr_ratio``."""
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    floor = spec.min_lr_ratio
    return spec.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def causal_lm_loss(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
        ignore_index=IGNORE)


def train(model, spec: TrainSpec, seed: int,
          on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train ``model`` in place (AdamW, grad-norm clip 1.0); returns the loss of every step."""
    # Subnormal floats appear in some gradients after a few steps and make CPU arithmetic
    # up to 50x slower; flushing them to zero changes nothing measurable in training.
    torch.set_flush_denormal(True)
    torch.manual_seed(seed)
    sampler = BatchSampler(spec.mixture, random.Random(seed))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}], lr=spec.lr, betas=(0.9, 0.98), eps=1e-8)
    model.train()
    losses = []
    for step in range(spec.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, spec)
        ids, labels = sampler.batch(spec.batch_size)
        loss = causal_lm_loss(model, ids, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses
