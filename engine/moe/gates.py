"""Router weights of an assembled MoE, computed as mergekit-moe computes them.

A layer's router is a matrix with one row per expert; a token goes to the experts whose rows
have the largest dot product with its hidden state. mergekit sets each row to a direction that
points at the expert's prompts:

* ``hidden`` / ``hidden_last``: run the base model on the expert's prompts (each prefixed with
  the BOS token text, left-padded with BOS as the pad token, one batch) and take, at each layer's
  input (the embedding output for layer 0, layer ``l - 1``'s output for layer ``l``; the final
  norm's output is not used), the hidden state of the last token, averaged over the prompts.
  mergekit runs the model in bfloat16 and keeps that dtype through the average, the difference
  and the normalisation; ``hidden_dtype: float32`` (ours) runs it all in float32.
* ``hidden_avg``: the same with the mean over each prompt's tokens instead of its last token.
  mergekit divides the sum over every position by the padded length, so padding (BOS) counts
  as part of the shorter prompts; ours averages over each prompt's own tokens only.
* ``cheap_embed``: the sum of the base's input embeddings of every (unpadded) token of the
  prompts, normalised to unit length, the same vector for every layer.
* ``random`` (standard normal) and ``uniform_random`` (U(-1/sqrt(h), 1/sqrt(h)), nn.Linear's
  initialisation): drawn from a generator seeded by the config's ``seed`` (mergekit's are
  unseeded).

With ``negative_prompts``, their vector is subtracted from the positive one; every row is then
normalised to unit L2 norm (norms clamped at 1e-8), as mergekit does.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from engine.moe.config import Expert

NORM_FLOOR = 1e-8


def prepare_tokenizer(tokenizer):
    """mergekit's batching: left padding with the BOS token as the pad token (EOS without BOS)."""
    tokenizer.padding_side = "left"
    if tokenizer.bos_token_id is not None:
        tokenizer.pad_token_id = tokenizer.bos_token_id
    else:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenize_prompts(tokenizer, prompts: list[str]) -> dict[str, torch.Tensor]:
    """One padded batch of ``BOS text + prompt``, no other special tokens (mergekit's)."""
    batch = tokenizer([(tokenizer.bos_token or "") + p for p in prompts], return_tensors="pt",
                      padding=True, add_special_tokens=False)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _unit_rows(vectors: torch.Tensor) -> torch.Tensor:
    return vectors / vectors.norm(p=2, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)


def cheap_embed_vector(embed: torch.Tensor, batch: dict[str, torch.Tensor], num_layers: int) -> torch.Tensor:
    """``(num_layers, hidden)``: the unit-norm sum of the prompts' token embeddings (float32)."""
    rows = embed.float()[batch["input_ids"]]                     # (prompts, tokens, hidden)
    summed = (rows * batch["attention_mask"].unsqueeze(-1).float()).sum(dim=1).sum(dim=0, keepdim=True)
    return _unit_rows(summed).repeat(num_layers, 1)


def hidden_vector(model, batch: dict[str, torch.Tensor], *, last: bool) -> torch.Tensor:
    """``(num_layers, hidden)`` in the model's dtype: each layer's input hidden state (last
    token, or the mean over each prompt's own tokens), averaged over the prompts."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items()}
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True, return_dict=True)
    states = torch.stack(out.hidden_states[:-1])                 # (layers, prompts, tokens, hidden)
    if last:  # left padding: the last position is every prompt's own last token
        per_prompt = states[:, :, -1, :]
    else:
        mask = inputs["attention_mask"].to(states.dtype)[None, :, :, None]
        per_prompt = (states * mask).sum(dim=2) / mask.sum(dim=2)
    return (per_prompt.sum(dim=1) / per_prompt.shape[1]).cpu()


def gate_vectors(mode: str, experts: list[Expert], *, num_layers: int, hidden_size: int,
                 seed: int = 0, tokenizer=None, embed: torch.Tensor | None = None, model=None,
                 progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """``(num_layers, len(experts), hidden_size)`` router rows for ``experts`` in ``mode``
    (``tokenizer`` for the prompt modes, ``embed`` for cheap_embed, ``model`` for hidden*)."""
    shape = (num_layers, len(experts), hidden_size)
    if mode == "random":
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if mode == "uniform_random":
        scale = math.sqrt(1.0 / hidden_size)
        return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 * scale - scale
    if mode == "cheap_embed":
        def vector(prompts):
            return cheap_embed_vector(embed, tokenize_prompts(tokenizer, prompts), num_layers)
    else:
        def vector(prompts):
            return hidden_vector(model, tokenize_prompts(tokenizer, prompts),
                                 last=mode != "hidden_avg")
    rows = []
    for i, expert in enumerate(experts):
        v = vector(expert.positive_prompts)
        if expert.negative_prompts:
            v = v - vector(expert.negative_prompts)
        rows.append(_unit_rows(v))
        if progress is not None:
            progress(i + 1, len(experts))
    return torch.stack(rows, dim=1)
