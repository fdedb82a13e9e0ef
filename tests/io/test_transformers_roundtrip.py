"""Item 17: a folder written by ModelWriter loads in transformers and computes the same logits."""

from __future__ import annotations

import pytest
import torch
import transformers

from engine.io import ModelFolder, ModelWriter


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_llama_written_by_modelwriter_loads_and_runs(tmp_path, tied):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        tie_word_embeddings=tied)
    model = transformers.LlamaForCausalLM(config).eval()  # random init
    state = model.state_dict()
    if tied:  # save like save_pretrained: the tied head is implied, not stored
        assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
        del state["lm_head.weight"]
    with ModelWriter(tmp_path / "out", config=config.to_dict(), max_shard_bytes=4096) as writer:
        for name, tensor in state.items():
            writer.add_tensor(name, tensor)

    assert len(ModelFolder(tmp_path / "out").shard_files) > 1  # the sharded path is exercised
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True).eval()
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        expected = model(ids).logits
        got = loaded(ids).logits
    assert got.shape == (1, 5, 32)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
