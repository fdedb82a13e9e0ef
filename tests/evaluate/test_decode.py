import random

import pytest
import torch

from engine.evaluate.decode import greedy_decode
from engine.evaluate.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE


@pytest.fixture(scope="module")
def random_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # A large init spreads the logits, so float noise cannot flip an argmax between paths.
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, initializer_range=0.3,
                         bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    return LlamaForCausalLM(config).eval()


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[BOS_ID] + [rng.randrange(4, VOCAB_SIZE) for _ in range(rng.randint(1, 14))]
            for _ in range(n)]


def test_batched_equals_one_by_one(random_llama):
    prompts = _prompts(40)
    batched = greedy_decode(random_llama, prompts, 8, eos_id=EOS_ID, pad_id=PAD_ID)
    single = [greedy_decode(random_llama, [p], 8, eos_id=EOS_ID, pad_id=PAD_ID)[0] for p in prompts]
    assert batched == single
    small_batches = greedy_decode(random_llama, prompts, 8, eos_id=EOS_ID, pad_id=PAD_ID,
                                  batch_size=7)
    assert small_batches == single


def test_matches_transformers_generate(random_llama):
    for prompt in _prompts(8, seed=1):
        ours = greedy_decode(random_llama, [prompt], 6, eos_id=EOS_ID, pad_id=PAD_ID)[0]
        ref = random_llama.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                    eos_token_id=EOS_ID, pad_token_id=PAD_ID)[0, len(prompt):]
        ref = ref.tolist()
        if EOS_ID in ref:
            ref = ref[:ref.index(EOS_ID) + 1]
        assert ours == ref


def test_stops_at_eos_and_respects_budget(random_llama):
    prompts = _prompts(20, seed=2)
    for out in greedy_decode(random_llama, prompts, 5, eos_id=EOS_ID, pad_id=PAD_ID):
        assert 1 <= len(out) <= 5
        assert EOS_ID not in out[:-1]
    assert greedy_decode(random_llama, prompts[:3], 0, eos_id=EOS_ID, pad_id=PAD_ID) == [[], [], []]



def test_kv_cache_path_equals_rerunning_the_sequence(random_llama):
    prompts = _prompts(30, seed=3)
    cached = greedy_decode(random_llama, prompts, 10, eos_id=EOS_ID, pad_id=PAD_ID)
    rerun = greedy_decode(random_llama, prompts, 10, eos_id=EOS_ID, pad_id=PAD_ID,
                          use_cache=False)
    assert cached == rerun
