"""The layer-by-layer part of a repair: statistics from activations, one decoder layer at a time.

- ``safety_hessian`` (Safe Delta): the *aligned* model runs the safety data; each layer's
  Hessians come from its unmodified inputs (the authors compute the next layer's inputs before
  adjusting a layer: no sequential correction). Linears outside the decoder layers (an untied
  head, ``tensors: all_linears``) get theirs from one full forward pass.
- ``task_hessian`` (IRR): the aligned model's Fisher on the safety data is computed first, for
  the target linears only; then the *fine-tune* runs its task data. With ``sequential`` each
  group of linears that share an input (Llama: q/k/v, o, gate/up, down) gets its Hessian
  through the groups and layers already repaired, and the repaired weights go into the running
  model before the next group (the authors' true-sequential pass); without it every Hessian
  comes from the unrepaired fine-tune.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.errors import ConfigError
from engine.io.staging import discard_staging, make_scratch_dir
from engine.merge.calibration import StatsFile, encode
from engine.repair.layerwise import (decoder_layers, first_layer_inputs, input_groups,
                                     layer_hessians, linear_modules, run_layer)
from engine.repair.statistics import batch_fisher, safety_examples, task_examples


def _load(folder, device):
    from engine.evaluate.loading import load_model_folder

    model, tokenizer = load_model_folder(folder.path)
    return model.to(device), tokenizer


def _samples(tokenizer, examples) -> list[list[int]]:
    return [ids for ids, _ in encode(tokenizer, examples)]


@torch.no_grad()
def _full_pass_hessians(model, samples, linears: dict) -> dict[str, torch.Tensor]:
    sums: dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = x.T @ x + sums[name] if name in sums else x.T @ x
        return hook

    device = next(model.parameters()).device
    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in linears.items()]
    try:
        for ids in samples:
            model(input_ids=torch.tensor([ids], device=device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: (2.0 / len(samples) * s).float() for n, s in sums.items()}


@dataclass
class Prepared:
    """What the layer loop needs, ready before the output is opened."""

    kind: str                      # "safety_hessian" | "task_hessian"
    model: torch.nn.Module         # the model whose activations are used
    samples: list[list[int]]       # token ids, one calibration sample each
    sequential: bool
    fisher: object                 # .get(name) -> the Fisher of one weight (a StatsFile)


def _spill(fisher: dict[str, torch.Tensor], cleanup: list) -> StatsFile:
    """The Fisher written to a private scratch file (the staging convention: swept if the run
    is killed) and read back one tensor at a time, so it is not held beside the running model."""
    folder = make_scratch_dir("repair-fisher")
    cleanup.append(folder)
    stored = StatsFile.write(fisher, folder / "fisher.safetensors", "fisher")
    fisher.clear()
    return stored


def discard(cleanup: list) -> None:
    """Remove the scratch folders ``prepare`` made."""
    while cleanup:
        discard_staging(cleanup.pop(), [])


def prepare(spec, opts, reader, pending, *, say, data_notes, warnings, safety_file, task_file,
            device, cleanup: list) -> Prepared:
    """Load the model(s), draw and check the data (a safety file without refusals is refused
    here, before anything is written) and compute IRR's Fisher (spilled to a scratch file that
    ``discard(cleanup)`` removes)."""
    kind = "task_hessian" if "task_hessian" in spec.stats else "safety_hessian"
    fisher = {}
    aligned_model, tokenizer = _load(reader.a, device)
    safety, notes = safety_examples(getattr(opts, "n_fisher", None) or opts.n_calibration,
                                    opts.calibration_seed, data=safety_file,
                                    aligned_model=aligned_model, tokenizer=tokenizer)
    warnings.extend(notes)
    data_notes["safety_examples"] = len(safety)
    data_notes["safety_source"] = str(safety_file.path) if safety_file else "zoo task refuse (train)"
    if kind == "task_hessian":
        say(0.0, "Fisher of the aligned model on its refusals")
        fisher = _spill(batch_fisher(aligned_model, tokenizer, safety, list(pending),
                                     batch_size=opts.fisher_batch_size), cleanup)
        del aligned_model
        model, tokenizer = _load(reader.f, device)
        examples, notes = task_examples(opts.n_calibration, opts.calibration_seed, task=opts.task,
                                        data=task_file, finetuned=reader.f.path)
        warnings.extend(notes)
        data_notes["task_examples"] = len(examples)
        data_notes["task_source"] = (str(task_file.path) if task_file
                                     else f"zoo task {opts.task or 'of the fine-tune'} (train)")
        sequential = opts.sequential
    else:
        model, examples, sequential = aligned_model, safety, False
    return Prepared(kind, model, _samples(tokenizer, examples), sequential, fisher)


def repair_layers(prepared: Prepared, reader, pending, emit, *, say, need_vector: bool) -> None:
    """Repair the ``pending`` linear weights layer by layer, handing each to ``emit``."""
    kind, model, samples, sequential = (prepared.kind, prepared.model, prepared.samples,
                                        prepared.sequential)
    fisher = prepared.fisher
    pending = list(pending)
    prefix, layers = decoder_layers(model)
    inputs = first_layer_inputs(model, samples)
    done = 0

    def repair_one(name: str, module: torch.nn.Linear, hessian: torch.Tensor) -> None:
        nonlocal done
        say(0.5 + 0.5 * done / max(1, len(pending)), name)
        item = reader.inputs(name, target=True, need_vector=need_vector)
        item.fisher = fisher.get(name) if kind == "task_hessian" else None
        setattr(item, kind, hessian)
        repaired = emit(name, item)
        if kind == "task_hessian":  # the running model carries the repair forward
            module.weight.data.copy_(repaired.to(module.weight.dtype))
        done += 1

    for index, layer in enumerate(layers):
        linears = {n: m for n, m in linear_modules(layer, f"{prefix}.{index}").items() if n in pending}
        if not linears:
            inputs = run_layer(layer, inputs)
            continue
        if sequential:
            for group in input_groups(layer, inputs[0], linears):
                hessians = layer_hessians(layer, inputs, {n: linears[n] for n in group})
                for name in group:
                    repair_one(name, linears[name], hessians.pop(name))
            inputs = run_layer(layer, inputs)
        else:
            hessians = layer_hessians(layer, inputs, linears)
            inputs = run_layer(layer, inputs)
            for name, module in linears.items():
                repair_one(name, module, hessians.pop(name))
    rest = [n for n in pending if n not in _done_names(layers, prefix)]
    if rest:
        modules = {f"{n}.weight": m for n, m in model.named_modules() if f"{n}.weight" in rest}
        missing = [n for n in rest if n not in modules]
        if missing:
            raise ConfigError("no linear module holds this weight", path=reader.f.path,
                              tensor=missing[0])
        hessians = _full_pass_hessians(model, samples, modules)
        for name in rest:
            repair_one(name, modules[name], hessians.pop(name))


def _done_names(layers, prefix) -> set[str]:
    return {n for i, layer in enumerate(layers) for n in linear_modules(layer, f"{prefix}.{i}")}


__all__ = ["Prepared", "discard", "prepare", "repair_layers"]
