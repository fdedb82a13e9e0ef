"""Router rows against references written here from mergekit-moe's definitions: float64 loops
over the prompts, the hidden states from transformers' own loader (not the engine's)."""

from __future__ import annotations

import pytest
import torch

from engine.moe.config import Expert
from engine.moe.gates import gate_vectors, prepare_tokenizer
from tests.moe.builders import build_family


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("gates"), experts=0)


def _tokenizer(folder):
    from engine.evaluate.loading import load_tokenizer

    return prepare_tokenizer(load_tokenizer(folder))


def _ids(prompt: str) -> list[int]:
    from engine.evaluate.tokenizer import BOS_ID, encode_chars

    return [BOS_ID] + encode_chars(prompt)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def test_cheap_embed_is_the_unit_sum_of_the_prompts_embeddings(family):
    from safetensors.torch import load_file

    embed = load_file(family["base"] / "model.safetensors")["model.embed_tokens.weight"]
    experts = [Expert(source_model="x", positive_prompts=["rev:abc=", "up:hello there="]),
               Expert(source_model="y", positive_prompts=["sort:cba="], negative_prompts=["rev:a=", "q"])]
    got = gate_vectors("cheap_embed", experts, num_layers=3, hidden_size=32,
                       tokenizer=_tokenizer(family["base"]), embed=embed)
    e64 = embed.double()

    def vector(prompts):
        total = torch.zeros(32, dtype=torch.float64)
        for prompt in prompts:  # BOS + every character, no padding
            for token in _ids(prompt):
                total += e64[token]
        return _unit(total)

    want = torch.stack([vector(experts[0].positive_prompts),
                        _unit(vector(experts[1].positive_prompts) - vector(experts[1].negative_prompts))])
    assert got.shape == (3, 2, 32)
    for layer in range(3):
        torch.testing.assert_close(got[layer].double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["hidden", "hidden_avg"])
def test_hidden_gates_match_a_float64_forward_per_prompt(family, mode):
    from transformers import AutoModelForCausalLM

    from engine.evaluate.loading import model_from_config
    from engine.io import ModelFolder

    with ModelFolder(family["base"]) as base:
        model = model_from_config(base.config, torch.float32)
        model.load_state_dict(dict(base.iter_tensors()))
    # equal-length prompts: the batch needs no padding, so one prompt at a time is the same
    experts = [Expert(source_model="x", positive_prompts=["rev:abc=", "rev:xyz="]),
               Expert(source_model="y", positive_prompts=["up:abcd="], negative_prompts=["rev:qrs="])]
    got = gate_vectors(mode, experts, num_layers=2, hidden_size=32,
                       tokenizer=_tokenizer(family["base"]), model=model)
    ref = AutoModelForCausalLM.from_pretrained(family["base"], dtype=torch.float64,
                                               trust_remote_code=False).eval()

    def vector(prompts):
        rows = []
        for prompt in prompts:
            with torch.no_grad():
                states = ref(torch.tensor([_ids(prompt)]), output_hidden_states=True).hidden_states
            # layer l's router sees layer l's input: hidden_states[l], l < num_layers
            rows.append(torch.stack([s[0, -1] if mode == "hidden" else s[0].mean(0) for s in states[:2]]))
        return torch.stack(rows).mean(0)

    want = torch.stack([_unit(vector(experts[0].positive_prompts)),
                        _unit(vector(experts[1].positive_prompts) - vector(experts[1].negative_prompts))],
                       dim=1)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_random_gates_are_seeded():
    experts = [Expert(source_model="x"), Expert(source_model="y"), Expert(source_model="z")]
    a = gate_vectors("random", experts, num_layers=4, hidden_size=16, seed=3)
    b = gate_vectors("random", experts, num_layers=4, hidden_size=16, seed=3)
    c = gate_vectors("random", experts, num_layers=4, hidden_size=16, seed=4)
    assert a.shape == (4, 3, 16) and torch.equal(a, b) and not torch.equal(a, c)
    u = gate_vectors("uniform_random", experts, num_layers=4, hidden_size=16, seed=3)
    assert float(u.abs().max()) <= 0.25 and float(u.std()) > 0.05  # U(-1/sqrt(16), 1/sqrt(16))
