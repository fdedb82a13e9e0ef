"""Where a tensor sits in a transformer, from its name alone: one rule for the recipes'
per-layer gradients, the cross-scale layer maps and the pages' layer x module tables.

A block index is the number after ``layers``, ``layer``, ``h`` (GPT-2), ``blocks`` or ``block``
(T5) as a whole dotted component; the first such component from the left counts, so in
``encoder.block.5.layer.1.DenseReluDense.wi.weight`` the block is 5 and ``layer.1`` is part of
its suffix. ``model.layers_extra.3.weight`` is in no block.
"""

from __future__ import annotations

import re

LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.(.*))?$")


def split_layer(tensor_name: str) -> tuple[int, str] | None:
    """(block index, the name after it: "" for the block itself), or None outside the blocks."""
    match = LAYER_RE.search(tensor_name)
    if match is None:
        return None
    return int(match.group(1)), match.group(2) or ""


def layer_index_of(tensor_name: str) -> int | None:
    """Index of the transformer block a tensor belongs to ("model.layers.7.mlp..." -> 7), else None."""
    split = split_layer(tensor_name)
    return split[0] if split is not None else None
