"""The two statistics fisher and regmean merge with, computed on one model in memory.

- ``fisher_diagonal``: per parameter, the mean over examples of the squared gradient of the
  example's log-likelihood of its answer tokens given its prompt (Matena & Raffel's empirical
  Fisher). One backward pass per example: the square of a batch's gradient is not the mean of
  the examples' squared gradients.
- ``gram_matrices``: per linear layer (``nn.Linear`` and GPT-2's Conv1D), ``X^T X / n_tokens``
  over the inputs the layer sees (forward pre-hooks; padding rows excluded; summed in float64).

What each model is calibrated on, and how the statistics reach a streamed merge, is
``engine.merge.calibration``'s job.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.errors import ParameterError


def answer_log_likelihood(model, ids: list[int], prompt_len: int) -> torch.Tensor:
    """Sum of log p(token | prefix) over the answer tokens (those after the prompt)."""
    x = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
    logits = model(input_ids=x, use_cache=False).logits[0, :-1]
    logp = torch.log_softmax(logits.float(), dim=-1)
    target = x[0, 1:]
    token_ll = logp.gather(-1, target[:, None])[:, 0]
    return token_ll[prompt_len - 1:].sum()


def fisher_diagonal(model, encoded: Sequence[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
    """Mean squared per-example gradient of the answer log-likelihood, per parameter name
    (fp32, CPU). A tied output head gets the embedding's entry under its own name too."""
    if not encoded:
        raise ParameterError("calibration needs at least one example")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    names, tensors = list(params), list(params.values())
    sums = [torch.zeros_like(p, dtype=torch.float32) for p in tensors]
    was_training = model.training
    model.eval()
    try:
        for ids, prompt_len in encoded:
            ll = answer_log_likelihood(model, ids, prompt_len)
            grads = torch.autograd.grad(ll, tensors, allow_unused=True)
            for acc, g in zip(sums, grads):
                if g is not None:
                    acc.add_(g.float().square())
    finally:
        model.train(was_training)
    out = {n: (s / len(encoded)).cpu() for n, s in zip(names, sums)}
    _alias_tied(model, out)
    return out


def _linear_modules(model) -> dict[str, tuple[torch.nn.Module, bool]]:
    """Linear layers by module name, with whether the weight is stored (in, out) (Conv1D)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always ships it
        Conv1D = ()  # noqa: N806
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            out[name] = (module, False)
        elif Conv1D and isinstance(module, Conv1D):
            out[name] = (module, True)
    return out


@torch.no_grad()
def gram_matrices(model, encoded: Sequence[tuple[list[int], int]], *, pad_id: int = 0,
                  batch_size: int = 16) -> dict[str, tuple[torch.Tensor, bool]]:
    """``{weight name: (X^T X / n_tokens, transposed)}`` for every linear layer (fp32, CPU);
    ``transposed`` is True where the weight is stored (in, out) (GPT-2 Conv1D)."""
    if not encoded:
        raise ParameterError("calibration needs at least one example")
    layers = _linear_modules(model)
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    current: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(module, args):
            x = args[0]
            rows = x.reshape(-1, x.shape[-1])[current["keep"]].double()
            gram = rows.T @ rows
            if name in sums:
                sums[name] += gram
            else:
                sums[name] = gram
            counts[name] = counts.get(name, 0) + rows.shape[0]
        return hook

    handles = [module.register_forward_pre_hook(hook_for(name)) for name, (module, _) in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(encoded), batch_size):
            batch = [ids for ids, _ in encoded[start:start + batch_size]]
            width = max(len(ids) for ids in batch)
            x = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, ids in enumerate(batch):  # right padding: causal attention never sees it
                x[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
                mask[i, :len(ids)] = 1
            current["keep"] = mask.reshape(-1).bool().to(device)
            model(input_ids=x.to(device), attention_mask=mask.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    out = {}
    for name, (_, transposed) in layers.items():
        if name in sums and counts[name] > 0:
            out[f"{name}.weight" if name else "weight"] = ((sums[name] / counts[name]).float().cpu(),
                                                           transposed)
    return out


def _alias_tied(model, stats: dict) -> None:
    """A parameter shared under several names (a tied head is the embedding): expose its
    statistic under every name."""
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) not in first:
            first[id(param)] = name
        elif first[id(param)] in stats:
            stats.setdefault(name, stats[first[id(param)]])
