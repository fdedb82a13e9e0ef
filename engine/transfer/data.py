"""The examples a transfer uses, drawn once and encoded once.

From a zoo task: disjoint draws of its *train* split (``engine.evaluate.tasks.train_stream``):
PostPKT's seed samples and fine-tune set, LaTen's extract and align sets. From ``--data
FILE.jsonl``: the file's dev split (``engine.evaluate.calibration_data``), drawn without
replacement and cycled when a set asks for more than the file holds (a warning says so).
Evaluation is always on the task's held-out examples, never on any of these.

An example is encoded as the zoo trains on it: ``<bos> prompt`` as context, ``answer <eos>`` as
the target (the loss is on the response only, as both papers train).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

IGNORE = -100
Example = tuple[str, str]


@dataclass
class Encoded:
    ids: list[int]
    labels: list[int]


def encode(tokenizer, example: Example) -> Encoded:
    prompt, answer = example
    p = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    a = list(tokenizer(answer, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    return Encoded(p + a, [IGNORE] * len(p) + a)


def collate(rows: list[Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):  # right padding: causal attention never sees the pads
        ids[i, :len(r.ids)] = torch.tensor(r.ids)
        labels[i, :len(r.labels)] = torch.tensor(r.labels)
    return ids, labels


def response_loss(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the response tokens."""
    logits = model(input_ids=ids, use_cache=False).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
        ignore_index=IGNORE)


class ExamplePool:
    """Distinct draws for named sets, in order (``take(n)`` never repeats an example of an
    earlier ``take`` from a zoo task)."""

    def __init__(self, task: str | None, seed: int, data=None):
        self.warnings: list[str] = []
        self.rng = random.Random(seed)
        self.data = data
        if data is None:
            from engine.evaluate.tasks import TASKS, train_stream

            self.stream = train_stream(TASKS[task], self.rng)
            self.seen: set[str] = set()
        else:
            self.order = list(data.examples)
            self.rng.shuffle(self.order)
            self.next = 0

    def take(self, n: int, what: str) -> list[Example]:
        if self.data is None:
            out = []
            while len(out) < n:
                ex = next(self.stream)
                if ex[0] not in self.seen:
                    self.seen.add(ex[0])
                    out.append(ex)
            return out
        total = len(self.order)
        if self.next + n > total:
            self.warnings.append(f"{self.data.named_by}: {what} asks for {n} examples, the dev "
                                 f"split has {total - self.next} left of {total}: cycled")
        out = [self.order[(self.next + i) % total] for i in range(n)]
        self.next = min(total, self.next + n)
        return out
