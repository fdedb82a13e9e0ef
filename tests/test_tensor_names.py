"""One rule for a tensor's transformer block, shared by the recipes' per-layer values, the
cross-scale layer maps and the pages' layer x module tables."""

from __future__ import annotations

import pytest
import torch

from engine.tensor_names import layer_index_of, split_layer

T5 = "encoder.block.5.layer.1.DenseReluDense.wi.weight"


@pytest.mark.parametrize("name, expected", [
    ("model.layers.12.mlp.up_proj.weight", (12, "mlp.up_proj.weight")),
    ("transformer.h.3.attn.c_attn.weight", (3, "attn.c_attn.weight")),
    ("blocks.0.attn.qkv.weight", (0, "attn.qkv.weight")),
    (T5, (5, "layer.1.DenseReluDense.wi.weight")),  # the block, not the layer inside it
    ("model.layers.0", (0, "")),
    ("model.layers.3.", (3, "")),
    ("model.embed_tokens.weight", None),
    ("lm_head.weight", None),
    ("model.norm.weight", None),
    ("model.layers_extra.3.weight", None),
    ("model.layers.x.weight", None),
    ("graph.3.weight", None),
])
def test_split_layer(name, expected):
    assert split_layer(name) == expected
    assert layer_index_of(name) == (expected[0] if expected else None)


def test_the_layer_maps_and_the_page_tables_use_the_same_rule(tmp_path):
    """A T5-style name belongs to its block in the incompatibility maps and on the pages (their
    own copies of the rule took ``layer.1`` inside block 5 for layer 1)."""
    import pages._analysis as glue
    from engine.analysis.incompatibility import layer_tensors
    from engine.io import ModelFolder
    from tests.io.builders import write_model

    assert glue.split_name(T5) == (5, "wi")
    assert glue.split_name("model.layers.2.self_attn.q_proj.weight") == (2, "q")
    assert glue.split_name("model.layers.2") == (None, "model.layers.2")
    tensors = {T5: torch.zeros(4, 3), "encoder.block.6.layer.0.SelfAttention.q.weight": torch.zeros(3, 3),
               "encoder.block.6.layer.0.layer_norm.weight": torch.zeros(3), "shared.weight": torch.zeros(5, 3)}
    with ModelFolder(write_model(tmp_path / "t5", tensors)) as folder:
        assert layer_tensors(folder) == {
            5: {"layer.1.DenseReluDense.wi.weight": T5},
            6: {"layer.0.SelfAttention.q.weight": "encoder.block.6.layer.0.SelfAttention.q.weight"}}
