"""Run a causal LM one decoder layer at a time, as SparseGPT, Safe Delta and IRR do.

The inputs of the first decoder layer are caught once per calibration sample (a forward
pre-hook that stops the forward there); each layer then runs on the cached inputs, with its
own positional arguments (rotary embeddings, masks) as the model passed them, and its outputs
become the next layer's inputs. Statistics are collected for one layer at a time, and a
layer's weights can be repaired before its outputs are computed (true-sequential) or after.

Samples run one per forward pass, unpadded, as the authors' calibration loaders do. The
Hessian of a linear layer is ``H = (2/N) sum over samples and tokens of x x^T`` (float64
sums, returned float32), with ``N`` the number of samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.errors import ConfigError

_LAYER_LIST_NAMES = ("layers", "h", "blocks")


class _Stop(Exception):
    """Raised by the catching hook to end a forward pass at the first decoder layer."""


def decoder_layers(model) -> tuple[str, torch.nn.ModuleList]:
    """``(module name, layers)`` of the model's stack of decoder layers."""
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, torch.nn.ModuleList) and len(module) > 0
             and name.rsplit(".", 1)[-1] in _LAYER_LIST_NAMES]
    if not found:
        raise ConfigError(f"no stack of decoder layers found in {type(model).__name__}")
    return max(found, key=lambda item: len(item[1]))


def linear_modules(module: torch.nn.Module, prefix: str) -> dict[str, torch.nn.Linear]:
    """``{weight name: nn.Linear}`` inside ``module`` (names as in the model's state dict)."""
    return {f"{prefix}.{name}.weight": sub for name, sub in module.named_modules()
            if isinstance(sub, torch.nn.Linear)}


@torch.no_grad()
def first_layer_inputs(model, samples: Sequence[list[int]]) -> list[tuple[tuple, dict]]:
    """Per sample, the ``(args, kwargs)`` the first decoder layer is called with."""
    _, layers = decoder_layers(model)
    device = next(model.parameters()).device
    caught: list[tuple[tuple, dict]] = []

    def catch(module, args, kwargs):
        caught.append((tuple(args), dict(kwargs)))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for ids in samples:
            try:
                model(input_ids=torch.tensor([list(ids)], dtype=torch.long, device=device),
                      use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return caught


def _hidden(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def run_layer(layer: torch.nn.Module, inputs: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    """The next layer's inputs: this layer's outputs in place of the hidden states."""
    out = []
    for args, kwargs in inputs:
        hidden = _hidden(layer(*args, **kwargs))
        if args:
            out.append(((hidden, *args[1:]), kwargs))
        else:
            out.append(((), {**kwargs, "hidden_states": hidden}))
    return out


@torch.no_grad()
def layer_hessians(layer: torch.nn.Module, inputs: list[tuple[tuple, dict]],
                   linears: dict[str, torch.nn.Linear]) -> dict[str, torch.Tensor]:
    """``{weight name: (2/N) sum x x^T}`` of ``linears`` (inside ``layer``) on ``inputs``."""
    sums = {name: None for name in linears}

    def hook_for(name):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            gram = x.T @ x
            sums[name] = gram if sums[name] is None else sums[name] + gram
        return hook

    handles = [module.register_forward_pre_hook(hook_for(name)) for name, module in linears.items()]
    try:
        for args, kwargs in inputs:
            layer(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    n = max(1, len(inputs))
    return {name: (2.0 / n * s).float() for name, s in sums.items() if s is not None}


@torch.no_grad()
def input_groups(layer: torch.nn.Module, sample: tuple[tuple, dict],
                 linears: dict[str, torch.nn.Linear]) -> list[list[str]]:
    """``linears`` grouped by the input they share, in the order the layer runs them (Llama:
    q/k/v, o, gate/up, down): the steps of a true-sequential pass."""
    seen: list[tuple[torch.Tensor, list[str]]] = []

    def hook_for(name):
        def hook(module, args):
            for tensor, names in seen:
                if tensor is args[0]:
                    names.append(name)
                    return
            seen.append((args[0], [name]))
        return hook

    handles = [module.register_forward_pre_hook(hook_for(name)) for name, module in linears.items()]
    try:
        layer(*sample[0], **sample[1])
    finally:
        for handle in handles:
            handle.remove()
    return [names for _, names in seen]


__all__ = ["decoder_layers", "first_layer_inputs", "input_groups", "layer_hessians",
           "linear_modules", "run_layer"]
