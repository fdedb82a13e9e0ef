"""PostPKT's pieces against independent references: the window against brute force, the SVD
against numpy, the PiSSA-style injection leaving the model's logits unchanged, the LoRA
wrapper against peft, and layer selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.transfer.lora import attach, merged_state, random_init
from engine.transfer.postpkt import (EMBED, PostPKTParams, best_window, inject_pissa, low_rank,
                                     lr_at, random_factors, select_layers, total_steps)


def tiny_llama(seed=0, hidden=16, layers=2, ffn=32, vocab=20):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=ffn, vocab_size=vocab,
                      max_position_embeddings=32, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def test_window_matches_brute_force_on_a_random_7x9_to_4x5():
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        s = torch.rand(7, 9, generator=gen)
        sums = {(i, j): float(s[i:i + 4, j:j + 5].sum()) for i in range(4) for j in range(5)}
        assert best_window(s, 4, 5) == max(sums, key=sums.get)
    assert best_window(torch.ones(3, 3), 3, 3) == (0, 0)
    with pytest.raises(ValueError):
        best_window(torch.ones(3, 3), 4, 1)


def test_low_rank_is_the_truncated_svd():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(12, 9, generator=gen)
    a, b = low_rank(w, 3)
    u, s, vh = np.linalg.svd(w.double().numpy(), full_matrices=False)
    np.testing.assert_allclose((b @ a).numpy(), (u[:, :3] * s[:3]) @ vh[:3], atol=1e-5)
    assert a.shape == (3, 9) and b.shape == (12, 3)


def test_pissa_injection_leaves_the_logits_unchanged_and_merging_is_exact():
    model = tiny_llama()
    ids = torch.tensor([[1, 5, 7, 3, 9]])
    before = model(ids).logits.detach()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(2)
    factors = {}
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head", EMBED):
        w = state[f"{name}.weight"]
        w = w.mT if name == EMBED else w
        factors[name] = low_rank(torch.randn(w.shape, generator=gen), 4)
    inject_pissa(model, factors, 2.0)
    assert not torch.allclose(model.state_dict()["lm_head.weight"], state["lm_head.weight"])
    attach(model, factors, 2.0, dropout=0.0)
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-4)
    merged = merged_state(model)
    assert set(merged) == set(state)
    for name, value in state.items():
        torch.testing.assert_close(merged[name], value, rtol=1e-4, atol=1e-5)


def test_lora_linear_and_embedding_match_peft():
    peft = pytest.importorskip("peft")
    model = tiny_llama(seed=3)
    ref = tiny_llama(seed=3)
    targets = ["q_proj", "v_proj", "embed_tokens"]
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0,
                          init_lora_weights=False)
    ref = peft.get_peft_model(ref, cfg).eval()
    factors = {}
    for name, module in ref.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            plain = name.replace("base_model.model.", "")
            factors[plain] = (module.lora_A["default"].weight.detach(), module.lora_B["default"].weight.detach())
        elif hasattr(module, "lora_embedding_A") and "default" in module.lora_embedding_A:
            plain = name.replace("base_model.model.", "")
            factors[plain] = (module.lora_embedding_A["default"].detach(),
                              module.lora_embedding_B["default"].detach())
    assert len(factors) == 5  # q, v of two layers and the embedding
    attach(model, factors, 8 / 4)
    ids = torch.tensor([[1, 4, 2, 8, 3]])
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-5)
    merged = merged_state(model)
    ref_merged = ref.merge_and_unload().state_dict()
    for name, value in ref_merged.items():
        torch.testing.assert_close(merged[name], value, rtol=1e-4, atol=1e-5)


def test_random_init_starts_at_the_model_and_selection_keeps_the_most_sensitive_layers():
    model = tiny_llama(layers=3)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    factors = random_factors(state, 3, 4, torch.Generator().manual_seed(0))
    assert all(float(b.abs().sum()) == 0.0 and float(a.abs().sum()) > 0 for a, b in factors.values())
    a, b = random_init(10, 25, 4, torch.Generator().manual_seed(0))
    assert a.abs().max() <= 1 / 5 and b.shape == (10, 4)
    scores = {"model.layers.0.x": torch.tensor([1.0]), "model.layers.1.x": torch.tensor([5.0]),
              "model.layers.2.x": torch.tensor([3.0]), "lm_head.weight": torch.tensor([99.0])}
    assert select_layers(scores, 3, 2) == [1, 2]
    assert select_layers(scores, 3, 3) == [0, 1, 2]


def test_schedule_and_step_budget():
    p = PostPKTParams()
    assert total_steps(p) == 3 * 16  # 3 epochs over 1,000 examples at 64
    assert lr_at(0, 48, 3e-4, 0.03) == pytest.approx(3e-4 / 2)  # ceil(1.44) = 2 warm-up steps
    assert lr_at(2, 48, 3e-4, 0.03) == pytest.approx(3e-4)
    assert lr_at(47, 48, 3e-4, 0.03) == pytest.approx(3e-4 / 46)
    with pytest.raises(Exception):
        PostPKTParams(rank=0)


def test_the_students_own_components_start_at_the_student_and_match_pissa():
    from engine.transfer.paper_measure import lora_cosines
    from engine.transfer.postpkt import prepare_student

    model = tiny_llama(seed=7)
    ids = torch.tensor([[1, 3, 5, 7]])
    before = model(ids).logits.detach()
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = PostPKTParams(rank=4, alpha=4, dropout=0.0, extract_from="student")
    trainable, report = prepare_student(model, None, None, None, params, control=False, seed=0)
    assert len(trainable) == 2 * (2 * 7 + 2)  # A and B of 7 matrices x 2 layers, embedding, head
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-4)
    cos = lora_cosines(original, report["initial_factors"], 1.0)
    for values in cos.values():  # the update is PiSSA's own: the same cosines
        assert values["vs_original"] == pytest.approx(values["pissa_vs_original"], abs=1e-5)
        assert abs(values["vs_remaining"]) < 1e-5
