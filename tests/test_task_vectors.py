"""engine/task_vectors.py: the one way in for model tensors (tied head, float32, LoRA).

Each rule is checked against an independent computation (a float64 subtraction of the stored
tensors, PEFT's own ``merge_and_unload``), and a static check keeps the rules in one file:
analysis, merge, what-if and compression read through it, none repeats the tied-head rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.errors import ConfigError, NonFiniteError
from engine.io import ModelFolder
from engine.lora.finetune import AdapterFinetune
from engine.task_vectors import (check_finite, read_model_tensor, stored_name,
                                 task_vector32)
from tests.lora.peft_builders import make_adapter, tiny_llama

REPO = Path(__file__).resolve().parents[1]


def _folder(path: Path, tensors: dict[str, torch.Tensor], tie: bool | None) -> ModelFolder:
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    if tie is not None:
        config["tie_word_embeddings"] = tie
    import json
    (path / "config.json").write_text(json.dumps(config))
    return ModelFolder(path)


def test_tied_head_reads_the_embedding(tmp_path):
    embed = torch.randn(8, 4, dtype=torch.bfloat16)
    tied = _folder(tmp_path / "tied", {"model.embed_tokens.weight": embed}, tie=True)
    assert stored_name(tied, "lm_head.weight") == "model.embed_tokens.weight"
    assert torch.equal(read_model_tensor(tied, "lm_head.weight"), embed)
    # an untied model without a head has none: refused, named
    untied = _folder(tmp_path / "untied", {"model.embed_tokens.weight": embed}, tie=False)
    assert stored_name(untied, "lm_head.weight") is None
    with pytest.raises(ConfigError, match="tensor missing"):
        read_model_tensor(untied, "lm_head.weight")


def test_float32_delta_of_bf16_tensors_equals_float64_subtraction(tmp_path):
    torch.manual_seed(0)
    w = torch.randn(64, 32).to(torch.bfloat16)
    # an update far below bf16's ulp at the weights' scale would vanish in bf16 arithmetic
    tuned = (w.double() + 1e-3 * torch.randn(64, 32, dtype=torch.float64)).to(torch.bfloat16)
    base = _folder(tmp_path / "b", {"w": w}, tie=None)
    ft = _folder(tmp_path / "f", {"w": tuned}, tie=None)
    delta = task_vector32(read_model_tensor(base, "w").float(), ft, "w")
    assert delta.dtype == torch.float32
    reference = tuned.double() - w.double()  # bf16 values are exact in float64
    assert torch.equal(delta.double(), reference)  # and their difference exact in float32 here
    assert float((tuned.float() - w.float() - (tuned - w).float()).abs().max()) > 0  # bf16 loses


def test_adapter_task_vector_is_peft_merge_minus_base(tmp_path):
    model = tiny_llama(tmp_path / "base", seed=0)
    merged = make_adapter(model, tmp_path / "adapter", seed=3, r=4, lora_alpha=8,
                          target_modules=["q_proj", "v_proj"])
    base = ModelFolder(tmp_path / "base")
    ft = AdapterFinetune(base, tmp_path / "adapter")
    name = "model.layers.0.self_attn.q_proj.weight"
    delta = task_vector32(read_model_tensor(base, name).float(), ft, name)
    reference = merged[name].double() - model.state_dict()[name].double()
    assert torch.allclose(delta.double(), reference, atol=1e-6, rtol=0)
    # an untouched tensor has an exact zero task vector
    other = "model.layers.0.mlp.up_proj.weight"
    zero = task_vector32(read_model_tensor(base, other).float(), ft, other)
    assert zero.shape == model.state_dict()[other].shape and not zero.any()


def test_adapter_over_a_tied_base_answers_for_the_head(tmp_path):
    model = tiny_llama(tmp_path / "base", seed=0, tie=True)
    make_adapter(model, tmp_path / "adapter", seed=4, r=2, lora_alpha=2,
                 target_modules=["q_proj"])
    base = ModelFolder(tmp_path / "base")
    ft = AdapterFinetune(base, tmp_path / "adapter")
    source = stored_name(ft, "lm_head.weight")
    assert source == "model.embed_tokens.weight"
    head = task_vector32(read_model_tensor(base, "lm_head.weight").float(), ft, "lm_head.weight",
                         source=source)
    assert not head.any()  # the adapter leaves the tied embedding alone


def test_check_finite_names_folder_and_tensor(tmp_path):
    folder = _folder(tmp_path / "m", {"w": torch.ones(2)}, tie=None)
    check_finite(torch.ones(3), folder, "w", "merge refused")
    with pytest.raises(NonFiniteError, match=r"2 NaN/Inf value\(s\).*merge refused") as err:
        check_finite(torch.tensor([1.0, float("nan"), float("inf")]), folder, "w", "merge refused")
    assert err.value.tensor == "w" and str(folder.path) in str(err.value.path)
    check_finite(torch.tensor([1, 2]), folder, "w", "merge refused")  # integers: nothing to check


# ---------------------------------------------------------------- one place for the rules
READERS = ["engine/delta.py", "engine/merge/plan.py", "engine/merge/whatif.py",
           "engine/compress/encode.py", "engine/lora/extract.py"]


def _called_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            out.add(func.id if isinstance(func, ast.Name) else getattr(func, "attr", ""))
    return out


@pytest.mark.parametrize("relpath", READERS)
def test_readers_do_not_repeat_the_tied_head_rule(relpath):
    """The tied-head rule (``is_tied``) is decided in engine/task_vectors.py only; the readers
    of analysis, merge, what-if, compression and extraction call into it."""
    called = _called_names(REPO / relpath)
    assert "is_tied" not in called, f"{relpath} decides tied heads itself"
    assert called & {"read_model_tensor", "read_stored", "task_vector32", "read_tensors",
                     "stored_name"}, f"{relpath} does not read through engine.task_vectors"
