"""Scoring a multimodal folder (a LLaVA member or a VisionFuse bundle): the zoo's vision tasks
through its encoders, and the text tasks through its language model alone."""

from __future__ import annotations

from pathlib import Path

from engine.errors import ParameterError
from engine.evaluate.vision_tasks import VISION_TASKS


def is_multimodal(path: str | Path) -> bool:
    from engine.visionfuse.bundle import is_bundle
    from engine.visionfuse.members import is_llava_folder

    return is_bundle(path) or is_llava_folder(path)


def split_tasks(tasks: list[str] | None) -> tuple[list[str] | None, list[str] | None]:
    """``(text tasks, vision tasks)`` of a task list (None: every task of that kind)."""
    if tasks is None:
        return None, None
    return [t for t in tasks if t not in VISION_TASKS], [t for t in tasks if t in VISION_TASKS]


def refuse_vision_on_text(path: str | Path, tasks: list[str] | None) -> None:
    """An image task asked of a text-only model: one line naming the model."""
    vision = [t for t in (tasks or []) if t in VISION_TASKS]
    if vision:
        raise ParameterError(f"model {Path(path).name!r} is text-only (no vision encoder): "
                             f"vision task {vision[0]!r} needs a multimodal model", path=path)


def evaluate_multimodal(path: str | Path, tasks: list[str] | None = None,
                        n_per_task: int | None = None, *, with_predictions: int = 0) -> dict:
    """``{"tasks": {...}, "perplexity": ...}``; every vision task's entry has
    ``"modality": "vision"``. ``tasks``: zoo text and vision task names (default: all)."""
    from engine.evaluate.scoring import Evaluator
    from engine.evaluate.tokenizer import build_tokenizer
    from engine.evaluate.vision_scoring import score_vision
    from engine.visionfuse.bundle import is_bundle, load

    text_tasks, vision_tasks = split_tasks(tasks)
    if is_bundle(path):
        fused = load(path)
        lm, streams = fused.lm, fused.streams
    else:
        from engine.zoo.mllm import load_member, streams_of

        lm, view = load_member(path)
        streams = streams_of(lm, view)
    if lm.config.get_text_config().vocab_size != build_tokenizer().vocab_size and text_tasks != []:
        raise ParameterError(f"model {Path(path).name!r}: the zoo's tasks need the zoo's "
                             "vocabulary", path=path)
    result = {"tasks": {}, "perplexity": None}
    if text_tasks != []:
        result = Evaluator(lm, build_tokenizer(), text_tasks, n_per_task).evaluate()
    if vision_tasks != []:
        result["tasks"].update(score_vision(lm, streams, vision_tasks, n_per_task,
                                            with_predictions=with_predictions)["tasks"])
    return result
