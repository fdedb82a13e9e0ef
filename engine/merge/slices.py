"""Layer stacks (frankenmerges): mergekit's ``slices``, each a layer range of its sources.

The output's layers are the slices' layers one after another. A slice's sources each give a
half-open ``layer_range`` ``[start, end)`` of one model (as mergekit: ``[0, 4]`` is layers 0 to
3), all of one length; its k-th output layer merges layer ``start + k`` of every source with the
recipe's method (passthrough for the one-source slices of a frankenmerge). The same model may
appear in several slices, with overlapping ranges (a self-merge repeats layers: that is what
``[0, 24]`` then ``[8, 32]`` of one model asks for).

As mergekit (mergekit/plan.py, 0.1.5):
  - gradients run over each slice's own layers: layer k of an n-layer slice has t = k / (n - 1)
    (1 for a one-layer slice); tensors outside the layers have t = 0;
  - parameter scopes are the recipe's ``parameters``, then the slice's, then each source's own;
  - the tensors before the layers (embeddings) are merged from the first slice's sources with its
    parameters, the ones after (final norm, head) from the last slice's;
  - a slice's base is its own ``base_model``, else the recipe's; a method needing a base finds it
    among the slice's sources (ours, where it is not: the base at the sources' common range).

The output config is the layout's (the base, else the first slice's first source) with the layer
count set and every per-layer list rebuilt from the layers actually stacked (``layer_types``
of Qwen2 and other transformers 5 configs, ``no_rope_layers``), and index lists such as Qwen2-MoE's
``mlp_only_layers`` renumbered: mergekit 0.1.5 sets only the count, and transformers refuses
a ``layer_types`` of another length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import ConfigError, IncompatibleModelsError, ParameterError
from engine.io import ModelFolder
from engine.merge.registry import MergeMethod
from engine.merge.spec import MergeSpec
from engine.recipe import MergeRecipe
from engine.tensor_names import LAYER_RE, layer_index_of, split_layer

# Config keys holding the layer count, by family (Llama and most: num_hidden_layers; GPT-2: n_layer).
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
# Config lists of layer indices (not one entry per layer): renumbered, not rebuilt.
INDEX_LIST_KEYS = frozenset({"mlp_only_layers"})
# Non-layer tensors that come before the layers: merged from the first slice's sources.
_PRE_PARTS = ("embed", "wte", "wpe", "word_embeddings")


@dataclass
class Route:
    """Where one output tensor comes from: the slice's spec, the base and model tensors."""

    spec: MergeSpec
    base: tuple[ModelFolder, str] | None
    models: list[tuple[ModelFolder, str]]

    def labels(self) -> tuple[str | None, list[str]]:
        return (str(self.base[0].path) if self.base is not None else None,
                [str(folder.path) for folder, _ in self.models])


@dataclass
class LayerStack:
    routes: dict[str, Route]                  # output name -> route, in output order
    layer_sources: list[tuple[ModelFolder, int]]  # output layer -> (its model, its layer there)
    specs: list[MergeSpec]                    # one per slice
    warnings: list[str] = field(default_factory=list)


def num_layers_of(folder: ModelFolder) -> int:
    """The number of blocks in a model folder, from its tensor names (the truth on disk)."""
    layers = [layer_index_of(n) for n in folder.tensor_names]
    return max((i for i in layers if i is not None), default=-1) + 1


def rename_layer(name: str, index: int) -> str:
    """``model.layers.7.mlp.up_proj.weight`` with block index ``index`` instead of 7."""
    match = LAYER_RE.search(name)
    if match is None:
        raise ValueError(f"{name!r} is in no layer")
    return name[:match.start(1)] + str(index) + name[match.end(1):]


def is_pre_layer(name: str) -> bool:
    """Whether a non-layer tensor sits before the layers (token and position embeddings)."""
    leaf = name.split(".")
    return any(part in piece for piece in leaf[:-1] for part in _PRE_PARTS)


def _layer_tensors(folder: ModelFolder) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for name in folder.tensor_names:
        layer = layer_index_of(name)
        if layer is not None:
            out.setdefault(layer, []).append(name)
    return out


def _prefix(folder: ModelFolder) -> str:
    """What comes before a block's index in the folder's names (``model.layers``, ``transformer.h``)."""
    for name in folder.tensor_names:
        match = LAYER_RE.search(name)
        if match is not None:
            return name[:match.start(1) - 1]
    raise ValueError(f"{folder.path} has no layers")


def _slice_layer_of(start: int):
    def layer_of(name: str) -> int | None:
        layer = layer_index_of(name)
        return None if layer is None else layer - start
    return layer_of


def check_ranges(recipe: MergeRecipe, sources: list[list[ModelFolder]]) -> list[int]:
    """Every layer range inside its model, non-empty, one length per slice; the lengths.
    Errors name the recipe key and the model."""
    lengths = []
    for i, (piece, folders) in enumerate(zip(recipe.slices or [], sources)):
        spans = []
        for j, (src, folder) in enumerate(zip(piece.sources, folders)):
            lo, hi = src.layer_range
            n = num_layers_of(folder)
            key = f"recipe key slices[{i}].sources[{j}].layer_range"
            if lo < 0 or hi <= lo:
                raise ConfigError(f"{key}: {[lo, hi]} is not a layer range (half-open [start, end), "
                                  "0 <= start < end)", path=src.model)
            if hi > n:
                raise ConfigError(f"{key}: {[lo, hi]} goes beyond the model's {n} layers (end is "
                                  f"exclusive: at most {n})", path=src.model)
            spans.append(hi - lo)
        if len(set(spans)) != 1:
            listed = ", ".join(f"{list(s.layer_range)} of {s.model}" for s in piece.sources)
            raise ConfigError(f"recipe key slices[{i}].sources: the sources of one slice must give "
                              f"the same number of layers, got {spans} ({listed})")
        lengths.append(spans[0])
    return lengths


def plan_layer_stack(recipe: MergeRecipe, method: MergeMethod, sources: list[list[ModelFolder]],
                     bases: list[ModelFolder | None], layout: ModelFolder) -> LayerStack:
    """Route every output tensor of a layer-stack recipe; raise before any work on any problem.

    ``sources[i][j]``: the opened folder of ``slices[i].sources[j]``; ``bases[i]``: slice i's
    base folder (its own ``base_model``, else the recipe's, else None)."""
    if method.stats is not None or method.model_stat:
        raise ParameterError(f"recipe key slices: {method.name} calibrates or rescales over the "
                             "whole model; it merges `models` or one full-depth slice, not a layer stack")
    lengths = check_ranges(recipe, sources)
    reference = {split_layer(n)[1] for n in _layer_tensors(layout).get(0, [])}
    routes: dict[str, Route] = {}
    layer_sources: list[tuple[ModelFolder, int]] = []
    specs: list[MergeSpec] = []
    slice_inputs = []
    warnings: list[str] = []
    offset = 0
    for i, (piece, folders, base, length) in enumerate(zip(recipe.slices, sources, bases, lengths)):
        starts = [s.layer_range[0] for s in piece.sources]
        base_in = None  # (folder, start) of the base
        members = list(range(len(folders)))
        if base is not None and (method.requires_base or method.optional_base):
            at = next((j for j, f in enumerate(folders) if f is base), None)
            if at is not None:
                base_in = (base, starts[at])
                members.remove(at)
            elif len(set(starts)) == 1:  # ours: the base at the sources' common range
                if starts[0] + length > num_layers_of(base):
                    raise ConfigError(f"recipe key slices[{i}]: the base {base.path} has fewer than "
                                      f"{starts[0] + length} layers")
                base_in = (base, starts[0])
            elif method.requires_base:
                raise ParameterError(f"recipe key slices[{i}].sources: {method.name} needs the base "
                                     f"model ({base.path}) among this slice's sources")
        if method.requires_base and base_in is None:
            raise ParameterError(f"recipe key slices[{i}]: {method.name} needs a base_model")
        if not members:
            raise ParameterError(f"recipe key slices[{i}].sources: no models to merge besides the base")
        try:
            spec = MergeSpec.build(method, [recipe.parameters, piece.parameters],
                                   [piece.sources[j].parameters for j in members], num_layers=length,
                                   seed=recipe.seed, layer_of=_slice_layer_of(offset))
        except ParameterError as err:
            raise ParameterError(f"recipe key slices[{i}]: {err.reason}") from None
        specs.append(spec)
        warnings += [w for w in spec.warnings if w not in warnings]
        slice_inputs.append((spec, base_in, [(folders[j], starts[j]) for j in members]))
        template, template_start = folders[0], starts[0]
        by_layer = _layer_tensors(template)
        for k in range(length):
            out_layer = offset + k
            names = by_layer.get(template_start + k, [])
            lacking = sorted(reference - {split_layer(n)[1] for n in names})
            if lacking:  # every layer has the layout's tensors (a layer without them is broken)
                missing = rename_layer(f"{_prefix(layout)}.0.{lacking[0]}", template_start + k)
                raise IncompatibleModelsError(
                    f"recipe key slices[{i}].sources[0]: the model lacks {missing!r}"
                    + (f" (+{len(lacking) - 1} more)" if len(lacking) > 1 else ""),
                    path=template.path, tensor=missing)
            for name in names:
                out_name = rename_layer(name, out_layer)
                shape = template.info(name).shape
                picks = [("base", *base_in)] if base_in else []
                picks += [(f"sources[{j}]", folders[j], starts[j]) for j in members]
                found = []
                for where, folder, start in picks:
                    src_name = rename_layer(name, start + k)
                    if src_name not in folder:
                        raise IncompatibleModelsError(
                            f"recipe key slices[{i}].{where}: the model lacks {src_name!r} (needed "
                            f"for output layer {out_layer})", path=folder.path, tensor=src_name)
                    if folder.info(src_name).shape != shape:
                        raise IncompatibleModelsError(
                            f"recipe key slices[{i}].{where}: {src_name!r} has shape "
                            f"{tuple(folder.info(src_name).shape)}, {template.path} has "
                            f"{tuple(shape)}", path=folder.path, tensor=src_name)
                    found.append((folder, src_name))
                base_pick = found.pop(0) if base_in else None
                routes[out_name] = Route(spec=spec, base=base_pick, models=found)
            layer_sources.append((template, template_start + k))
        offset += length
    pre = _outer_routes(layout, slice_inputs[0], before=True)
    post = _outer_routes(layout, slice_inputs[-1], before=False)
    ordered = {**pre, **routes, **post}
    for i, spec in enumerate(specs):
        try:
            spec.check([n for n, r in ordered.items() if r.spec is spec])
        except ParameterError as err:
            raise ParameterError(f"recipe key slices[{i}]: {err.reason}", tensor=err.tensor) from None
    return LayerStack(routes=ordered, layer_sources=layer_sources, specs=specs, warnings=warnings)


def _outer_routes(layout: ModelFolder, slice_input, *, before: bool) -> dict[str, Route]:
    """The non-layer tensors before (``before``) or after the layers, from one slice's inputs
    (compatibility of these tensors was checked for every model already)."""
    spec, base_in, members = slice_input
    out = {}
    for name in layout.tensor_names:
        if layer_index_of(name) is None and is_pre_layer(name) == before:
            out[name] = Route(spec=spec, base=(base_in[0], name) if base_in else None,
                              models=[(folder, name) for folder, _ in members])
    return out


def stack_config(config: dict, layer_sources: list[tuple[ModelFolder, int]]) -> dict:
    """The layout's config for the stacked layers: the layer count, each per-layer list rebuilt
    from the layers taken (entry j of the list of the model each layer comes from), each index
    list renumbered. A list some source lacks, or whose length is not its layer count, is left
    out (transformers then derives its default from the new count)."""
    out = dict(config)
    n = len(layer_sources)
    keys = [k for k in LAYER_COUNT_KEYS if isinstance(out.get(k), int)] or ["num_hidden_layers"]
    for key in keys:
        out[key] = n
    donor_layers = config.get(keys[0]) if isinstance(config.get(keys[0]), int) else None
    for key, value in config.items():
        if not isinstance(value, list) or "layer" not in key:
            continue
        if key in INDEX_LIST_KEYS:
            try:
                out[key] = [i for i, (folder, j) in enumerate(layer_sources)
                            if j in set(folder.config.get(key) or [])]
            except TypeError:  # not a list of indices
                out.pop(key)
            continue
        if donor_layers is None or len(value) != donor_layers:
            continue  # not one entry per layer
        rebuilt = []
        for folder, j in layer_sources:
            theirs = folder.config.get(key)
            own_count = next((folder.config[k] for k in keys if isinstance(folder.config.get(k), int)), None)
            if not isinstance(theirs, list) or len(theirs) != own_count:
                rebuilt = None
                break
            rebuilt.append(theirs[j])
        if rebuilt is None:
            out.pop(key)
        else:
            out[key] = rebuilt
    return out


__all__ = ["LayerStack", "Route", "check_ranges", "is_pre_layer", "num_layers_of", "plan_layer_stack",
           "rename_layer", "stack_config"]
