"""What a compression did to a fine-tune: per-tensor reconstruction error and task accuracy
of the rebuilt model (for the compression lab; everything read lazily, tensor by tensor)."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.compress.pipeline import rebuild_state_dict
from engine.io import ModelFolder


def reconstruction_errors(artifact: str | Path, base: str | Path, finetuned: str | Path) -> list[dict]:
    """Per tensor: ``||d_hat - d|| / ||d||`` (fp64 norms; 0 for an exactly stored delta)."""
    rebuilt = rebuild_state_dict(artifact, base)
    rows = []
    with ModelFolder(base) as base_folder, ModelFolder(finetuned) as ft_folder:
        for name, tensor in rebuilt.items():
            w0 = base_folder.get_tensor(name).to(torch.float64)
            delta = ft_folder.get_tensor(name).to(torch.float64) - w0
            delta_hat = tensor.to(torch.float64) - w0
            norm = float(delta.norm())
            error = float((delta_hat - delta).norm())
            rows.append({"tensor": name, "shape": list(tensor.shape), "delta_norm": norm,
                         "rel_error": error / norm if norm > 0 else (0.0 if error == 0 else float("inf"))})
    return rows


def rebuilt_accuracy(artifact: str | Path, base: str | Path, tasks: list[str] | None = None,
                     n_per_task: int = 64) -> dict:
    """Zoo-task scores of the fine-tune rebuilt from ``artifact`` (in memory, nothing written)."""
    from engine.evaluate import evaluate_state_dict
    from engine.evaluate.loading import load_tokenizer

    with ModelFolder(base) as base_folder:
        config = dict(base_folder.config)
    tokenizer = load_tokenizer(base, config.get("vocab_size"))
    state = rebuild_state_dict(artifact, base)
    return evaluate_state_dict(state, config, tokenizer, tasks=tasks, n_per_task=n_per_task,
                               n_generic=0)
