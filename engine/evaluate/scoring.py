"""Task accuracy (greedy decoding, exact match) and held-out perplexity.

``Evaluator`` tokenizes the held-out sets once and scores a model; its
``evaluate_state_dict`` loads new weights into the same model object, so a what-if merge is
scored without rebuilding anything (a few seconds on CPU for the zoo's models).
"""

from __future__ import annotations

import math

import torch

from engine.errors import ConfigError, ParameterError
from engine.evaluate.decode import greedy_decode
from engine.evaluate.tasks import TASK_NAMES, TASKS, heldout_examples, heldout_generic

DEFAULT_N_PER_TASK = 128
DEFAULT_N_GENERIC = 128


def _token_ids(tokenizer, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


class Evaluator:
    """Scores one model object on held-out task examples and generic text.

    ``tasks``: task names (default: every zoo task); ``n_per_task`` held-out examples each;
    ``n_generic`` held-out generic lines for perplexity (0 to skip it). ``skip``: leave out each
    task's first ``skip`` held-out examples, so an evaluator with ``skip = n`` scores a dev set
    disjoint from the ``n`` examples another one reports (tune on the one, report the other).
    """

    def __init__(self, model, tokenizer, tasks: list[str] | None = None,
                 n_per_task: int | None = None, n_generic: int | None = None,
                 batch_size: int = 512, *, skip: int = 0):
        names = list(TASK_NAMES if tasks is None else tasks)
        unknown = [t for t in names if t not in TASKS]
        if unknown:
            raise ParameterError(f"unknown task(s) {unknown}; known: {TASK_NAMES}")
        n = DEFAULT_N_PER_TASK if n_per_task is None else int(n_per_task)
        n_generic = DEFAULT_N_GENERIC if n_generic is None else int(n_generic)
        if n < 1 or n_generic < 0 or skip < 0:
            raise ParameterError("n_per_task must be >= 1, n_generic and skip >= 0")
        if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
            raise ParameterError("the tokenizer needs eos and pad tokens")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id
        self.task_sets = {}
        for name in names:
            examples = heldout_examples(TASKS[name], skip + n)[skip:]
            prompts = [_token_ids(tokenizer, p, special=True) for p, _ in examples]
            answers = [_token_ids(tokenizer, a, special=False) + [self.eos_id] for _, a in examples]
            self.task_sets[name] = (examples, prompts, answers)
        self.generic_ids = [_token_ids(tokenizer, line, special=True) + [self.eos_id]
                            for line in heldout_generic(n_generic)] if n_generic else []

    def task_predictions(self, name: str) -> list[list[int]]:
        _, prompts, answers = self.task_sets[name]
        longest = max(len(a) for a in answers)
        return greedy_decode(self.model, prompts, longest, eos_id=self.eos_id,
                             pad_id=self.pad_id, batch_size=self.batch_size)

    def task_accuracy(self, name: str) -> dict:
        _, _, answers = self.task_sets[name]
        predictions = self.task_predictions(name)
        correct = sum(pred == ans for pred, ans in zip(predictions, answers))
        return {"accuracy": correct / len(answers), "n": len(answers)}

    @torch.no_grad()
    def perplexity(self) -> float | None:
        """exp(mean next-token NLL) over held-out generic lines (every token after <bos>)."""
        if not self.generic_ids:
            return None
        device = next(self.model.parameters()).device
        total_nll, total_tokens = 0.0, 0
        for start in range(0, len(self.generic_ids), self.batch_size):
            rows = self.generic_ids[start:start + self.batch_size]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, row in enumerate(rows):  # right padding: causal attention never sees it
                ids[i, :len(row)] = torch.tensor(row)
                mask[i, :len(row)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            target = ids[:, 1:]
            nll = -logp.gather(-1, target[..., None])[..., 0]
            keep = mask[:, 1:].bool()
            total_nll += float(nll[keep].double().sum())
            total_tokens += int(keep.sum())
        return math.exp(total_nll / total_tokens)

    def all_task_accuracies(self) -> dict[str, dict]:
        """Every task in ONE batched decode (one pass of per-call overhead instead of one per
        task). Each row is decoded exactly as alone (padding is invisible), and a row's
        prediction is cut to its own task's longest answer, so the scores equal
        :meth:`task_accuracy`'s (tested)."""
        prompts, spans = [], {}
        for name, (_, task_prompts, answers) in self.task_sets.items():
            spans[name] = (len(prompts), len(prompts) + len(task_prompts),
                           max(len(a) for a in answers))
            prompts.extend(task_prompts)
        longest = max(span[2] for span in spans.values())
        # long prompts together, short together: less padding per batch
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        decoded = greedy_decode(self.model, [prompts[i] for i in order], longest,
                                eos_id=self.eos_id, pad_id=self.pad_id,
                                batch_size=self.batch_size)
        predictions: list[list[int]] = [[] for _ in prompts]
        for i, tokens in zip(order, decoded):
            predictions[i] = tokens
        result = {}
        for name, (start, stop, task_longest) in spans.items():
            answers = self.task_sets[name][2]
            preds = [p[:task_longest] for p in predictions[start:stop]]
            correct = sum(pred == ans for pred, ans in zip(preds, answers))
            result[name] = {"accuracy": correct / len(answers), "n": len(answers)}
        return result

    def evaluate(self) -> dict:
        was_training = self.model.training
        self.model.eval()
        try:
            result = {"tasks": self.all_task_accuracies()}
            result["perplexity"] = self.perplexity()
        finally:
            self.model.train(was_training)
        return result

    def evaluate_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict:
        """Load ``state_dict`` (any float dtype; cast by ``load_state_dict``) into the model
        and evaluate. Every parameter must be present: a missing tensor is an error, not a
        silently kept old weight."""
        _load_strict(self.model, state_dict)
        return self.evaluate()


def _load_strict(model, state_dict, path=None) -> None:
    """Load ``state_dict`` into ``model``; names and shapes must fit (``path``: the folder the
    weights came from, named in the error)."""
    own = model.state_dict()
    expected = set(own)
    # Tied or buffer-only names may be absent from a checkpoint; everything else must be there.
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = sorted(expected - set(state_dict) - tied)
    unexpected = sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ParameterError(f"state dict does not fit the model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}", path=path)
    # A config that disagrees with its weights (hidden_size edited, say): named here, instead
    # of torch's multi-line size-mismatch traceback from load_state_dict.
    for name, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise ConfigError(f"the config describes shape {tuple(own[name].shape)} but the weights "
                              f"hold {tuple(tensor.shape)} (config.json disagrees with its tensors)",
                              path=path, tensor=name)
    model.load_state_dict(state_dict, strict=False)


def evaluate_model(model, tokenizer, tasks: list[str] | None = None,
                   n_per_task: int | None = None, n_generic: int | None = None) -> dict:
    """``{"tasks": {name: {"accuracy", "n"}}, "perplexity": float}`` for one model object."""
    return Evaluator(model, tokenizer, tasks, n_per_task, n_generic).evaluate()
