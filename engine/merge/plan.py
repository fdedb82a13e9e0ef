"""Plan a merge: open every model folder a recipe names (LoRA adapters over their bases,
frankenmerge slices, a merged tokenizer), check them against each other and resolve every
tensor's parameters, all before any tensor is read; then say what the output holds (its
tensors' names, dtypes and shapes, its config, its tokenizer files) and read one output
tensor's inputs.

``engine.merge.executor`` runs a plan; nothing here merges or writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from engine.compat import embed_head_names, require_compatible
from engine.errors import ConfigError, ParameterError
from engine.io import ModelFolder
from engine.io.side_files import TOKENIZER_FILES as SIDE_TOKENIZER_FILES
from engine.io.side_files import read_side_files
from engine.lora.adapter import LoraAdapter, is_adapter_folder
from engine.lora.finetune import AdapterFinetune
from engine.merge.registry import MergeMethod, get_method
from engine.merge.slices import LayerStack, num_layers_of, plan_layer_stack, stack_config
from engine.merge.spec import MergeSpec
from engine.merge.vocab import VocabPlan, build_vocab_plan, has_tokenizer, tokenizer_path
from engine.recipe import MergeRecipe, check_recipe_paths, resolve_model_ref, split_lora_ref
from engine.task_vectors import read_model_tensor
from engine.tensor_names import layer_index_of

# Files copied from the tokenizer source next to the merged weights (when present).
TOKENIZER_FILES = (*SIDE_TOKENIZER_FILES, "generation_config.json")


@dataclass
class MergePlan:
    """A validated recipe bound to opened model folders."""

    recipe: MergeRecipe
    method: MergeMethod
    base: ModelFolder | None          # the base model (None for base-free methods without one)
    layout: ModelFolder               # whose tensor names/order/config the output follows
    models: list[ModelFolder]         # the inputs merged (the base excluded)
    spec: MergeSpec                   # the method with its parameters, resolved per tensor
    tokenizer_folder: ModelFolder
    vocab_target: int | None
    num_layers: int | None
    warnings: list[str] = field(default_factory=list)
    opened: list = field(default_factory=list)  # everything plan_merge opened (adapters' bases too)
    stack: LayerStack | None = None   # a frankenmerge: where each output tensor comes from
    vocab: VocabPlan | None = None    # a merged tokenizer: embedding rows follow tokens

    def close(self) -> None:
        for folder in {id(f): f for f in [self.layout, self.tokenizer_folder, *self.models,
                                           *([self.base] if self.base else []), *self.opened]}.values():
            folder.close()

    def input_paths(self) -> list[Path]:
        """Every folder the merge reads (an adapter's base included): never a destination."""
        paths = []
        for model in [self.layout, *self.models]:
            paths.append(model.path)
            if isinstance(model, AdapterFinetune):
                paths.append(model.base.path)
        return paths



def plan_merge(recipe: MergeRecipe, *, recipe_dir: str | Path | None = None,
               allowed_roots: Iterable[str | Path] | None = None) -> MergePlan:
    """Open and check everything a merge needs; raise before any work on any problem.

    ``allowed_roots``: where the recipe's model folders must lie (the app and its jobs give
    ``settings.allowed_roots()``; the command line reads what its user names)."""
    method = get_method(recipe.merge_method)
    roots = list(allowed_roots) if allowed_roots is not None else None

    def _resolve_model_path(ref: str, key: str) -> Path:
        return resolve_model_ref(ref, key=key, recipe_dir=recipe_dir, allowed_roots=roots)

    if roots is not None:
        check_recipe_paths(recipe, roots, recipe_dir=recipe_dir)  # every key, before any is opened
    stacked = is_layer_stack(recipe, _resolve_model_path)
    entries = [] if stacked else recipe.input_models()
    base_path = (_resolve_model_path(split_lora_ref(recipe.base_model)[0], "base_model")
                 if recipe.base_model else None)
    if method.requires_base and base_path is None and not stacked:  # a stack's slices may name theirs
        raise ParameterError(f"{method.name} needs a base_model")

    opened: dict[Path, ModelFolder] = {}

    def open_folder(path: Path) -> ModelFolder:
        key = path.resolve()
        if key not in opened:
            opened[key] = ModelFolder(path)
        return opened[key]

    adapters: list[AdapterFinetune] = []

    def open_model(ref: str, key: str, base: ModelFolder | None):
        """A model folder, or a LoRA adapter over its base: ``BASE+ADAPTER`` names both, an
        adapter folder alone takes the recipe's base_model."""
        base_ref, adapter_ref = split_lora_ref(ref)
        path = _resolve_model_path(base_ref, key)
        if adapter_ref is not None:
            adapter_path = _resolve_model_path(adapter_ref, f"{key}+adapter")
            adapters.append(AdapterFinetune(open_folder(path), adapter_path))
            return adapters[-1]
        if is_adapter_folder(path):
            if base is None:  # the adapter's own base_model_name_or_path, when it is a local folder
                named = LoraAdapter(path).base_model_path()
                if named is None or not Path(named).is_absolute() or not Path(named).is_dir():
                    raise ConfigError(f"recipe key {key}: a LoRA adapter needs a base (write "
                                      "BASE+ADAPTER, or give base_model)", path=ref)
                base = open_folder(_resolve_model_path(named, f"{key} (the adapter's "
                                                              "base_model_name_or_path)"))
            adapters.append(AdapterFinetune(base, path))
            return adapters[-1]
        return open_folder(path)

    try:
        base = open_model(recipe.base_model, "base_model", None) if base_path is not None else None
        if stacked:
            plan = _plan_stack(recipe, method, base, open_model,
                               lambda: _tokenizer_folder(recipe, None, open_folder, _resolve_model_path),
                               _resolve_model_path)
            plan.opened = [*adapters, *opened.values()]
            return plan
        models, settings, keys = [], [], []
        entry_keys = [key for key, _ in recipe.model_refs() if key.endswith(".model")]
        for entry, key in zip(entries, entry_keys):
            if (base_path is not None and (method.requires_base or method.optional_base)
                    and split_lora_ref(entry.model)[1] is None
                    and _resolve_model_path(entry.model, key).resolve() == base_path.resolve()):
                continue  # mergekit lists the base among the models; it contributes as the base
            models.append(open_model(entry.model, key, base))
            settings.append(entry.parameters)
            keys.append(key)
        if not models:
            raise ParameterError(f"{method.name}: no models to merge besides the base")
        layout = base if base is not None else models[0]
        tokenizer_folder = _tokenizer_folder(recipe, layout, open_folder, _resolve_model_path)
        inputs = [*([("base_model", base)] if base is not None else []), *zip(keys, models)]
        merging_vocab = _merges_vocab(recipe, layout)

        report = require_compatible(layout, [m for m in models if m is not layout],
                                    vocab_policy="pad_from_base" if merging_vocab else recipe.vocab_policy)
        vocab = (build_vocab_plan(recipe, inputs, layout, resolve=_resolve_model_path,
                                  source_folder=tokenizer_folder, base_model=base)
                 if merging_vocab else None)
        if vocab is not None and method.stats is not None and not vocab.is_identity():
            raise ParameterError(f"recipe key {'tokenizer' if recipe.tokenizer else 'tokenizer_source'}: "
                                 f"{method.name} calibrates each model in its own vocabulary; a merged "
                                 "tokenizer that moves, adds or pads rows is not supported with it")
        num_layers = layout.config.get("num_hidden_layers", layout.config.get("n_layer"))
        if recipe.slices is not None and num_layers is not None:
            lo, hi = recipe.slices[0].sources[0].layer_range
            if (lo, hi) != (0, num_layers):  # only LoRA adapters get here (see is_layer_stack)
                raise ParameterError(f"recipe key slices[0]: layer_range {[lo, hi]} of a LoRA "
                                     f"adapter must cover all {num_layers} layers")

        spec = MergeSpec.build(method, recipe.parameter_scopes(), settings,
                               num_layers=num_layers, seed=recipe.seed)
        plan = MergePlan(
            recipe=recipe, method=method, base=base, layout=layout, models=models, spec=spec,
            tokenizer_folder=tokenizer_folder,
            vocab_target=None if vocab else report.info.get("vocab", {}).get("target"),
            num_layers=num_layers, vocab=vocab,
            warnings=list(report.warnings) + list(spec.warnings) + (vocab.warnings if vocab else []),
        )
        # Resolve and validate the parameters of every tensor now (cheap), so that a bad
        # gradient or filter value fails before any tensor is read.
        spec.check(layout.tensor_names)
    except BaseException:
        for folder in [*adapters, *opened.values()]:
            folder.close()
        raise
    plan.opened = [*adapters, *opened.values()]
    return plan


def is_layer_stack(recipe: MergeRecipe, resolve: Callable[[str, str], Path]) -> bool:
    """Whether a recipe stacks layer ranges (several slices, sources of different ranges, or
    one range short of the whole model) rather than merging whole models."""
    if recipe.slices is None:
        return False
    if not recipe.uniform_slice():
        return True
    first = recipe.slices[0].sources[0]
    base_ref, adapter_ref = split_lora_ref(first.model)
    path = resolve(base_ref, "slices[0].sources[0].model")
    if adapter_ref is not None or is_adapter_folder(path):
        return False  # LoRA adapters: whole models only (a partial range is refused in the plan)
    with ModelFolder(path) as folder:
        return tuple(first.layer_range) != (0, num_layers_of(folder))


def _merges_vocab(recipe: MergeRecipe, tokenizer_base: ModelFolder) -> bool:
    """Whether embedding rows follow a merged tokenizer (``engine.merge.vocab``): a ``tokenizer``
    mapping or ``tokenizer_source: union`` always; a legacy ``tokenizer_source`` naming base or
    a model when the tokenizer base has a tokenizer (else its files are copied as they are)."""
    if not recipe.merges_tokenizer():
        return False
    if recipe.tokenizer is not None or recipe.tokenizer_model() == "union":
        return True
    return has_tokenizer(tokenizer_path(tokenizer_base))


def _tokenizer_folder(recipe: MergeRecipe, layout: ModelFolder | None, open_folder,
                      resolve) -> ModelFolder | None:
    """The folder whose tokenizer files are written (``layout`` for "base")."""
    tok_ref = recipe.tokenizer_model()
    if tok_ref in ("base", "union"):
        return layout
    tok_key = "tokenizer.source" if recipe.tokenizer else "tokenizer_source"
    return open_folder(resolve(tok_ref, tok_key))


def _plan_stack(recipe: MergeRecipe, method: MergeMethod, base: ModelFolder | None,
                open_model, tokenizer_folder, resolve) -> MergePlan:
    """The plan of a layer stack (``engine.merge.slices``): every source and slice base opened,
    the models' non-layer tensors checked against the layout, every output tensor routed."""
    sources = [[open_model(s.model, f"slices[{i}].sources[{j}].model", base)
                for j, s in enumerate(piece.sources)] for i, piece in enumerate(recipe.slices)]
    bases = [open_model(piece.base_model, f"slices[{i}].base_model", None)
             if piece.base_model is not None else base for i, piece in enumerate(recipe.slices)]
    layout = base if base is not None else sources[0][0]
    distinct = list({id(f): f for f in [*(f for row in sources for f in row),
                                         *(b for b in bases if b is not None)]}.values())
    merging_vocab = _merges_vocab(recipe, layout)
    report = require_compatible(layout, [f for f in distinct if f is not layout], layer_stack=True,
                                vocab_policy="pad_from_base" if merging_vocab else recipe.vocab_policy)
    stack = plan_layer_stack(recipe, method, sources, bases, layout)
    models = [f for f in distinct if f is not layout]  # slice bases too: never a destination
    tokenizer = tokenizer_folder() or layout
    vocab = None
    if merging_vocab:
        keys = {id(f): f"slices[{i}].sources[{j}].model" for i, row in enumerate(sources)
                for j, f in reversed(list(enumerate(row)))}
        keys.update({id(b): (f"slices[{i}].base_model" if recipe.slices[i].base_model else "base_model")
                     for i, b in enumerate(bases) if b is not None})
        vocab = build_vocab_plan(recipe, [(keys[id(f)], f) for f in distinct], layout, resolve=resolve,
                                 source_folder=tokenizer, base_model=base)
    return MergePlan(recipe=recipe, method=method, base=base, layout=layout,
                     models=models or [sources[0][0]], spec=stack.specs[0],
                     tokenizer_folder=tokenizer,
                     vocab_target=None if vocab else report.info.get("vocab", {}).get("target"),
                     num_layers=len(stack.layer_sources), vocab=vocab,
                     warnings=list(report.warnings) + stack.warnings + (vocab.warnings if vocab else []),
                     stack=stack)


def input_tensor(plan: MergePlan, folder: ModelFolder, name: str) -> torch.Tensor:
    """One model's tensor for an output name: tied heads read the embedding; vocab by policy."""
    embed, head = embed_head_names(folder)
    tensor = read_model_tensor(folder, name)  # compat has refused missing tensors already
    target = plan.vocab_target
    if target is not None and name in (embed, head) and tensor.dim() >= 1 and tensor.shape[0] != target:
        if tensor.shape[0] > target:
            tensor = tensor[:target]
        else:  # pad_from_base: rows the model lacks come from the base (a zero delta)
            base_rows = input_tensor(plan, plan.layout, name)
            tensor = torch.cat([tensor, base_rows[tensor.shape[0]:target].to(tensor.dtype)])
    return tensor


def read_inputs(plan: MergePlan, name: str) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """One tensor of every input, read without memory maps (NaN/Inf are caught by the merge,
    which names the folder)."""
    if plan.stack is not None:
        route = plan.stack.routes[name]
        pairs = [route.base] if route.base is not None else []
        pairs += route.models
    else:
        pairs = ([(plan.base, name)] if plan.base is not None else []) + [(m, name) for m in plan.models]
    has_base = plan.base is not None if plan.stack is None else route.base is not None
    tensors = [input_tensor(plan, folder, source) for folder, source in pairs]
    if plan.vocab is not None and name in embed_head_names(plan.layout):
        # rows moved to the merged vocabulary by token, before the method sees them
        tensors = plan.vocab.permute([(folder, t) for (folder, _), t in zip(pairs, tensors)])
    return (tensors[0] if has_base else None), tensors[1 if has_base else 0:]


def output_layout(plan: MergePlan) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of every output tensor, in the layout's order (vocab by policy)."""
    embed, head = embed_head_names(plan.layout)
    out = []
    for name in (plan.stack.routes if plan.stack is not None else plan.layout.tensor_names):
        info = plan.layout.info(name) if name in plan.layout else None
        if plan.stack is not None and (info is None or layer_index_of(name) is not None):
            route = plan.stack.routes[name]
            folder, source = route.models[0]
            info = folder.info(source)
        shape = tuple(info.shape)
        if plan.vocab_target is not None and name in (embed, head) and shape and shape[0] != plan.vocab_target:
            shape = (plan.vocab_target, *shape[1:])
        if plan.vocab is not None and name in (embed, head):
            shape = (plan.vocab.rows, *shape[1:])
        out.append((name, plan.recipe.output_dtype(info.dtype), shape))
    return out


def output_config(plan: MergePlan) -> dict:
    config = dict(plan.layout.config)
    if plan.stack is not None:
        config = stack_config(config, plan.stack.layer_sources)
    if plan.recipe.dtype or plan.recipe.out_dtype:
        dtype_name = str(plan.recipe.output_dtype(torch.float32)).removeprefix("torch.")
        config["torch_dtype"] = dtype_name
        if "dtype" in config:
            config["dtype"] = dtype_name
    if plan.vocab_target is not None and config.get("vocab_size") not in (None, plan.vocab_target):
        config["vocab_size"] = plan.vocab_target
    if plan.vocab is not None:
        config["vocab_size"] = plan.vocab.rows
    return config


def tokenizer_files(folder: ModelFolder) -> dict[str, bytes]:
    """The tokenizer source's side files, vetted and read once (a symlink out of the folder, a
    FIFO or a config asking for code is refused, not copied)."""
    return read_side_files(folder.path, TOKENIZER_FILES)
