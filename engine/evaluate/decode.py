"""Batched greedy decoding for causal LMs with left padding.

Prompts of different lengths are left-padded so every row's next token sits in the last
column. Padding must be invisible to the model: the attention mask hides pad keys, and the
position ids count only real tokens (``cumsum(mask) - 1``), so a padded row computes the
same rotary positions, hence the same logits, as the prompt decoded alone (tested).
The first step runs the whole prompt and keeps the model's key/value cache; each later step
feeds only the new token (its position id is the row's next real position), so a step costs
one token per row instead of the whole sequence. Models whose forward takes no cache fall
back to rerunning the sequence (same tokens: tested).
"""

from __future__ import annotations

import inspect

import torch


def _cache_argument(model) -> str:
    """The forward argument that carries the key/value cache: ``cache`` in transformers 5.2x
    and later, ``past_key_values`` before."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def greedy_decode(model, prompts: list[list[int]], max_new_tokens: int, *, eos_id: int,
                  pad_id: int, batch_size: int = 512, use_cache: bool = True) -> list[list[int]]:
    """Greedy continuations of token-id prompts: each list ends at its first ``eos_id``
    (included) or after ``max_new_tokens`` tokens."""
    device = next(model.parameters()).device
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        out.extend(_decode_batch(model, prompts[start:start + batch_size], max_new_tokens,
                                 eos_id, pad_id, device, use_cache))
    return out


def _decode_batch(model, prompts, max_new_tokens, eos_id, pad_id, device, use_cache=True):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt):] = 1
    ids, mask = ids.to(device), mask.to(device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    generated = []
    past = None
    cache_argument = _cache_argument(model) if use_cache else None
    for _ in range(max_new_tokens):
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        if past is None:
            output = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                           use_cache=use_cache)
        else:
            output = model(input_ids=ids[:, -1:], attention_mask=mask,
                           position_ids=positions[:, -1:], use_cache=True,
                           **{cache_argument: past})
        past = None
        if use_cache:
            past = getattr(output, "cache", None)
            if past is None:
                past = getattr(output, "past_key_values", None)
        logits = output.logits[:, -1, :]
        next_token = logits.argmax(dim=-1)
        next_token = torch.where(done, torch.full_like(next_token, pad_id), next_token)
        generated.append(next_token)
        done = done | (next_token == eos_id)
        ids = torch.cat([ids, next_token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if bool(done.all()):
            break
    if not generated:
        return [[] for _ in prompts]
    table = torch.stack(generated, dim=1).cpu().tolist()
    result = []
    for row in table:
        tokens = []
        for tok in row:
            tokens.append(tok)
            if tok == eos_id:
                break
        result.append(tokens)
    return result
