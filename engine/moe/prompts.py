"""Routing prompts for an expert from the demo zoo: its task's training-split prompts.

A zoo fine-tune's task comes from the enclosing ``zoo.json`` (``engine.merge.calibration.
zoo_task_of``, the one rule for calibration too); the prompts are drawn from the task's
training stream (never the held-out half, on which a routed MoE is scored), with a seed.
"""

from __future__ import annotations

import random
from pathlib import Path


def zoo_task_prompts(folder: str | Path, n: int = 8, seed: int = 0) -> tuple[str | None, list[str]]:
    """``(task, prompts)`` of a zoo fine-tune; ``(None, [])`` for a folder in no zoo or a base."""
    from engine.evaluate.tasks import TASKS, train_stream
    from engine.merge.calibration import zoo_task_of

    task = zoo_task_of(folder)
    if task not in TASKS:
        return None, []
    stream = train_stream(TASKS[task], random.Random(seed))
    prompts: list[str] = []
    while len(prompts) < n:
        prompt, _answer = next(stream)
        if prompt not in prompts:
            prompts.append(prompt)
    return task, prompts
