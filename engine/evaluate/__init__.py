"""Evaluation of zoo-tokenizer models: task exact-match accuracy and held-out perplexity.

Result shape everywhere: ``{"tasks": {name: {"accuracy": float, "n": int}}, "perplexity": float}``.
"""

from engine.evaluate.loading import (cached_evaluator, evaluate_folder, evaluate_state_dict,
                                     load_model_folder, model_from_config)
from engine.evaluate.scoring import Evaluator, evaluate_model
from engine.evaluate.tasks import TASK_NAMES, TASKS, heldout_examples

__all__ = ["Evaluator", "TASKS", "TASK_NAMES", "cached_evaluator", "evaluate_folder",
           "evaluate_model", "evaluate_state_dict", "heldout_examples", "load_model_folder",
           "model_from_config"]
