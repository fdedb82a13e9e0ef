"""Compressing a LoRA fine-tune: the adapter's delta enters compression as PEFT's merged model
would (rebuilt tensors agree), and the artifact rebuilds over the base."""

from __future__ import annotations

import torch

from engine.compress import compress, decompress
from engine.io import ModelFolder
from tests.lora.peft_builders import make_adapter, save_merged, tiny_llama


def test_compressing_an_adapter_equals_compressing_its_merged_model(tmp_path):
    model = tiny_llama(tmp_path / "base")
    reference = make_adapter(model, tmp_path / "adapter", target_modules=["q_proj", "v_proj", "up_proj"])
    save_merged(model, reference, tmp_path / "merged")
    base = tmp_path / "base"
    for name, ft in (("lora", tmp_path / "adapter"), ("full", tmp_path / "merged")):
        compress(base, ft, tmp_path / f"art_{name}", "svd", ratio=4)
        decompress(tmp_path / f"art_{name}", base, tmp_path / f"rebuilt_{name}")
    with ModelFolder(tmp_path / "rebuilt_lora") as lora, ModelFolder(tmp_path / "rebuilt_full") as full:
        assert lora.tensor_names == full.tensor_names
        assert lora.config == full.config
        for name in lora.tensor_names:
            # The adapter's delta is B @ A exactly; the merged model's is (base + B @ A) - base,
            # off by float32 rounding (~3e-8). SVD factors of the two are then stored in fp16
            # (a relative step of 2^-11 on values up to ~0.4), so the rebuilt tensors agree to
            # fp16 rounding of the factors, not to float32.
            torch.testing.assert_close(lora.get_tensor(name), full.get_tensor(name), atol=1e-4, rtol=0,
                                       msg=name)
    # the artifact's side files came from the base (the adapter folder has no config.json)
    import json

    assert json.loads((tmp_path / "rebuilt_lora" / "config.json").read_text()) == json.loads(
        (base / "config.json").read_text())
