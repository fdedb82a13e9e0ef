"""What a compression did to a fine-tune, for the compression lab: per-tensor reconstruction
error and the rebuilt model's task accuracy, from ONE pass over the artifact (each tensor is
rebuilt once, compared against the fine-tune read lazily, and kept for the evaluation)."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.compress.rebuild import iter_rebuilt, open_checked
from engine.io import ModelFolder
from engine.lora.finetune import open_finetune


def _rel_error(rebuilt: torch.Tensor, base: torch.Tensor, finetuned: torch.Tensor) -> tuple[float, float]:
    """(||d||, ||d_hat - d|| / ||d||) in float64; 0 for an exactly stored delta."""
    w0 = base.to(torch.float64)
    delta = finetuned.to(torch.float64) - w0
    norm = float(delta.norm())
    error = float((rebuilt.to(torch.float64) - w0 - delta).norm())
    return norm, (error / norm if norm > 0 else (0.0 if error == 0 else float("inf")))


def measure_rebuilt(artifact: str | Path, base: str | Path, finetuned: str | Path,
                    tasks: list[str] | None = None, n_per_task: int = 64, eval_sets=()) -> dict:
    """``{"errors": [{"tensor", "shape", "delta_norm", "rel_error"}], "accuracy": <evaluator
    result>}`` of the fine-tune rebuilt from ``artifact`` (in memory, nothing written)."""
    from engine.evaluate.loading import add_eval_sets, cached_evaluator, load_tokenizer, model_from_config
    from engine.evaluate.scoring import _load_strict

    errors, state = [], {}
    with ModelFolder(base) as base_folder, open_finetune(finetuned, base_folder) as ft_folder:
        config = dict(base_folder.config)
        found, spec, params = open_checked(artifact, base_folder)
        for name, tensor in iter_rebuilt(found, spec, params, base_folder):
            tensor = tensor.to("cpu", torch.float32)
            norm, rel = _rel_error(tensor, base_folder.get_tensor(name), ft_folder.get_tensor(name))
            errors.append({"tensor": name, "shape": list(tensor.shape), "delta_norm": norm,
                           "rel_error": rel})
            state[name] = tensor
    tokenizer = load_tokenizer(base, config.get("vocab_size"))
    if tasks is not None and len(tasks) == 0:  # the user's eval sets only
        model = model_from_config(config)
        _load_strict(model, state)
        accuracy = add_eval_sets({"tasks": {}, "perplexity": None}, model, tokenizer, eval_sets)
    else:
        evaluator = cached_evaluator(config, tokenizer, tasks, n_per_task, 0)
        accuracy = add_eval_sets(evaluator.evaluate_state_dict(state), evaluator.model, tokenizer,
                                 eval_sets)
    return {"errors": errors, "accuracy": accuracy}
