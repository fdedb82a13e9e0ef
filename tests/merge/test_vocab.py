"""Merged tokenizers: every output token's embedding and head row rebuilt here by hand from
the input files and the tokenizers' own vocabularies (a plain loop over tokens, no engine
code); the written tokenizer loads and encodes the new tokens; the config's vocab size; chat
templates; parity with mergekit's union when MERGEKIT_YAML is set. Tokenizers are built offline
with the ``tokenizers`` library."""

from __future__ import annotations

import json
import os
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from engine.merge.executor import run_merge
from engine.recipe import parse_recipe
from tests.merge.test_mergekit_methods import load_tensors, mergekit_yaml

WORDS = ["<pad>", "<s>", "</s>", *"abcdefghijklmnop"]   # V = 19
CHAT = ["<|im_start|>", "<|im_end|>"]                   # a fine-tune's added special tokens
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def save_tokenizer(folder: Path, words: list[str], special: list[str] = (), kind: str = "wordlevel"):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words)}
    if kind == "wordlevel":
        core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    else:
        core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if special:
        tok.add_special_tokens({"additional_special_tokens": list(special)})
    tok.save_pretrained(folder)
    return tok


def hf_model(folder: Path, vocab: int, seed: int, words, special=(), kind="wordlevel") -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder, safe_serialization=True)
    save_tokenizer(folder, words, special, kind)
    return folder


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """base (V tokens), chat (V + 2 added special tokens), perm (the same V tokens, shuffled ids),
    extra (V + 1: a plain token 'zz' of its own)."""
    root = tmp_path_factory.mktemp("vocab")
    shuffled = WORDS[:3] + list(reversed(WORDS[3:]))
    return {
        "base": hf_model(root / "base", len(WORDS), 0, WORDS),
        "chat": hf_model(root / "chat", len(WORDS) + 2, 1, WORDS, CHAT),
        "perm": hf_model(root / "perm", len(WORDS), 2, shuffled),
        "extra": hf_model(root / "extra", len(WORDS) + 1, 3, WORDS + ["zz"]),
        "extra2": hf_model(root / "extra2", len(WORDS) + 1, 4, WORDS + ["zz"]),
    }


def vocab_of(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False).get_vocab()


def merge(recipe, out):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_merge(parse_recipe(recipe), out).out


def rows_by_token(folder: Path, name: str) -> dict[str, torch.Tensor]:
    tensors, vocab = load_tensors(folder), vocab_of(folder)
    return {tok: tensors[name][i].double() for tok, i in vocab.items() if i < tensors[name].shape[0]}


def expected_row(token, models, base=None, rules=None):
    """mergekit's default row of ``token`` for a model that lacks it (plain float64 loop)."""
    rules = rules or {}
    if token in rules:
        return rules[token]
    have = [m for m in models if token in m]
    if len(have) == 1:
        return have[0][token]
    if not have:
        return None
    if base is not None and token in base:
        return base[token]
    return sum(m[token] for m in have) / len(have)


@pytest.mark.parametrize("name", [EMBED, HEAD])
def test_union_of_a_fine_tune_with_added_tokens_and_a_shuffled_one(zoo, tmp_path, name):
    """linear, weights 0.2 / 0.3 / 0.5 over base (V), chat (V + 2) and perm (V, ids shuffled):
    the output has the V + 2 tokens; each token's row is the weighted mean of each model's row
    of that token, a model lacking it contributing the rule's row."""
    recipe = {"merge_method": "linear", "dtype": "float32", "tokenizer": {"source": "union"},
              "models": [{"model": str(zoo[k]), "parameters": {"weight": w}}
                         for k, w in (("base", 0.2), ("chat", 0.3), ("perm", 0.5))]}
    out = merge(recipe, tmp_path / "out")
    vocab = vocab_of(out)
    assert sorted(vocab) == sorted(WORDS + CHAT) and sorted(vocab.values()) == list(range(len(WORDS) + 2))
    assert vocab == {**{w: i for i, w in enumerate(WORDS)}, **{t: len(WORDS) + i for i, t in enumerate(CHAT)}}
    ins = [rows_by_token(zoo[k], name) for k in ("base", "chat", "perm")]
    got = load_tensors(out)[name].double()
    assert got.shape[0] == len(WORDS) + 2
    for token, i in vocab.items():
        rows = [m[token] if token in m else expected_row(token, ins) for m in ins]
        want = (0.2 * rows[0] + 0.3 * rows[1] + 0.5 * rows[2]) / 1.0
        torch.testing.assert_close(got[i], want, rtol=1e-6, atol=1e-6, msg=token)
    # the added tokens come only from chat: their row is chat's, whatever the weights
    for token in CHAT:
        torch.testing.assert_close(got[vocab[token]], ins[1][token], rtol=1e-6, atol=1e-6)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == len(WORDS) + 2


def test_without_a_base_a_token_two_models_have_takes_their_mean(zoo, tmp_path):
    """No base_model: the first model is only the tokenizer base; the model lacking 'zz' gets
    the mean of the two rows that exist (mergekit's rule uses a base only when there is one)."""
    recipe = {"merge_method": "linear", "dtype": "float32", "tokenizer": {"source": "union"},
              "models": [{"model": str(zoo[k]), "parameters": {"weight": w}}
                         for k, w in (("base", 0.5), ("extra", 0.25), ("extra2", 0.25))]}
    out = merge(recipe, tmp_path / "out")
    vocab = vocab_of(out)
    got = load_tensors(out)[EMBED].double()
    base, extra, extra2 = (rows_by_token(zoo[k], EMBED) for k in ("base", "extra", "extra2"))
    mean = (extra["zz"] + extra2["zz"]) / 2
    torch.testing.assert_close(got[vocab["zz"]], 0.5 * mean + 0.25 * extra["zz"] + 0.25 * extra2["zz"],
                               rtol=1e-6, atol=1e-6)


def test_union_with_a_base_tokens_entries_force_and_padding(zoo, tmp_path):
    """task_arithmetic over base + chat + extra: the base's row where it has the token and another
    model lacks it, one model's row where only it has it; `tokens`: a zero row forced on every
    model, a token from a named model, a new token from a model's given row; rows padded to 8."""
    recipe = {"merge_method": "task_arithmetic", "base_model": str(zoo["base"]), "dtype": "float32",
              "tokenizer": {"source": "union", "pad_to_multiple_of": 8, "tokens": {
                  "<|im_end|>": {"source": {"kind": "zero"}, "force": True},
                  "zz": {"source": str(zoo["extra"])},
                  "<new>": {"source": {"kind": "model_token", "model": str(zoo["chat"]), "token": "b"}}}},
              "models": [{"model": str(zoo["chat"]), "parameters": {"weight": 0.7}},
                         {"model": str(zoo["extra"]), "parameters": {"weight": 0.4}}]}
    out = merge(recipe, tmp_path / "out")
    vocab = vocab_of(out)
    assert set(vocab) == set(WORDS + CHAT + ["zz", "<new>"])
    got = load_tensors(out)[EMBED].double()
    n = len(vocab)
    assert got.shape[0] == 8 * -(-n // 8) > n
    base, chat, extra = (rows_by_token(zoo[k], EMBED) for k in ("base", "chat", "extra"))
    rules = {"<new>": chat["b"]}
    for token, i in vocab.items():
        if token == "<|im_end|>":
            want = torch.zeros_like(got[i])  # forced zero in every model: base + 0 deltas
        else:
            rows = []
            for m in (base, chat, extra):
                rows.append(m[token] if token in m else expected_row(token, [base, chat, extra], base, rules))
            want = rows[0] + 0.7 * (rows[1] - rows[0]) + 0.4 * (rows[2] - rows[0])
        torch.testing.assert_close(got[i], want, rtol=1e-6, atol=1e-6, msg=token)
    # padding rows: each model's padding is the mean of its real rows, merged like any other
    pad_means = []
    for m in (base, chat, extra):
        rows = [torch.zeros_like(got[0]) if t == "<|im_end|>" else
                (m[t] if t in m else expected_row(t, [base, chat, extra], base, rules)) for t in sorted(vocab, key=vocab.get)]
        pad_means.append(torch.stack(rows).mean(0))
    want = pad_means[0] + 0.7 * (pad_means[1] - pad_means[0]) + 0.4 * (pad_means[2] - pad_means[0])
    for i in range(n, got.shape[0]):
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-6)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == got.shape[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=False)
    ids = tok("<|im_start|> a zz", add_special_tokens=False)["input_ids"]
    assert ids == [vocab["<|im_start|>"], vocab["a"], vocab["zz"]]
    assert torch.isfinite(model(torch.tensor([ids])).logits).all()


def test_source_base_and_source_model_drop_or_keep_the_added_tokens(zoo, tmp_path):
    models = [{"model": str(zoo["base"]), "parameters": {"weight": 0.5}},
              {"model": str(zoo["chat"]), "parameters": {"weight": 0.5}}]
    base_out = merge({"merge_method": "linear", "dtype": "float32", "models": models,
                      "tokenizer_source": "base"}, tmp_path / "b")
    assert set(vocab_of(base_out)) == set(WORDS) and load_tensors(base_out)[EMBED].shape[0] == len(WORDS)
    chat_out = merge({"merge_method": "linear", "dtype": "float32", "models": models,
                      "tokenizer": {"source": str(zoo["chat"])}}, tmp_path / "c")
    vocab = vocab_of(chat_out)
    got = load_tensors(chat_out)[EMBED].double()
    chat = rows_by_token(zoo["chat"], EMBED)
    base = rows_by_token(zoo["base"], EMBED)
    for token in CHAT:  # only chat has them: the base takes chat's rows, the mean is chat's row
        torch.testing.assert_close(got[vocab[token]], chat[token], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[vocab["a"]], (base["a"] + chat["a"]) / 2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("template,expected", [
    ("chatml", "<|im_start|>user\nhi<|im_end|>\n"),
    ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}", "[user] hi"),
])
def test_chat_template_is_written_with_the_tokenizer(zoo, tmp_path, template, expected):
    from transformers import AutoTokenizer

    out = merge({"merge_method": "linear", "dtype": "float32", "chat_template": template,
                 "tokenizer": {"source": "union"},
                 "models": [{"model": str(zoo[k]), "parameters": {"weight": 1.0}} for k in ("base", "chat")]},
                tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=False)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == expected


def test_chat_template_auto_takes_the_inputs_template(zoo, tmp_path):
    from transformers import AutoTokenizer

    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    own = tmp_path / "templated"
    import shutil

    shutil.copytree(zoo["chat"], own)
    tok = AutoTokenizer.from_pretrained(own)
    tok.chat_template = template
    tok.save_pretrained(own)
    out = merge({"merge_method": "linear", "dtype": "float32", "chat_template": "auto",
                 "models": [{"model": str(zoo["base"]), "parameters": {"weight": 1.0}},
                            {"model": str(own), "parameters": {"weight": 1.0}}],
                 "tokenizer": {"source": "union"}}, tmp_path / "out")
    assert AutoTokenizer.from_pretrained(out).chat_template == template


# ---------------------------------------------------------------- parity with mergekit
PARITY = {
    "union_linear": lambda z: {"merge_method": "linear", "dtype": "float32", "tokenizer": {"source": "union"},
                               "models": [{"model": str(z["base"]), "parameters": {"weight": 0.4}},
                                          {"model": str(z["chat"]), "parameters": {"weight": 0.6}}]},
    "union_task_arithmetic_tokens": lambda z: {
        "merge_method": "task_arithmetic", "base_model": str(z["base"]), "dtype": "float32",
        "tokenizer": {"source": "union", "tokens": {"<|im_end|>": {"source": {"kind": "zero"}, "force": True}}},
        "models": [{"model": str(z["chat"]), "parameters": {"weight": 0.7}},
                   {"model": str(z["perm"]), "parameters": {"weight": 0.3}}]},
    "union_mean_no_base": lambda z: {
        "merge_method": "linear", "dtype": "float32", "tokenizer": {"source": "union"},
        "models": [{"model": str(z[k]), "parameters": {"weight": w}}
                   for k, w in (("base", 0.5), ("extra", 0.25), ("extra2", 0.25))]},
    "source_chat_padded": lambda z: {
        "merge_method": "linear", "dtype": "float32",
        "tokenizer": {"source": str(z["chat"]), "pad_to_multiple_of": 8},
        "models": [{"model": str(z["base"]), "parameters": {"weight": 0.5}},
                   {"model": str(z["chat"]), "parameters": {"weight": 0.5}}]},
}


@pytest.mark.parametrize("name", sorted(PARITY))
def test_tokenizer_merges_match_mergekit(zoo, tmp_path, name):
    exe = mergekit_yaml()
    if exe is None:
        pytest.skip("no mergekit venv (set MERGEKIT_YAML to its mergekit-yaml)")
    recipe = PARITY[name](zoo)
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    theirs_dir = tmp_path / "mergekit"
    proc = subprocess.run([exe, str(path), str(theirs_dir), "--no-cuda", "--allow-crimes", "--quiet"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours_dir = merge(recipe, tmp_path / "ours")
    assert vocab_of(ours_dir) == vocab_of(theirs_dir)
    ours, theirs = load_tensors(ours_dir), load_tensors(theirs_dir)
    assert sorted(ours) == sorted(theirs)
    for tensor, t in theirs.items():
        assert ours[tensor].shape == t.shape, tensor
        scale = float(t.abs().max()) or 1.0
        diff = float((ours[tensor].double() - t.double()).abs().max())
        assert diff <= 1e-4 * scale, f"{tensor}: max |ours - mergekit| {diff:.3g}"
    assert (json.loads((ours_dir / "config.json").read_text())["vocab_size"]
            == json.loads((theirs_dir / "config.json").read_text())["vocab_size"])


def test_legacy_tokenizer_source_union_is_the_tokenizer_mapping(zoo, tmp_path):
    models = [{"model": str(zoo[k]), "parameters": {"weight": 0.5}} for k in ("base", "chat")]
    a = load_tensors(merge({"merge_method": "linear", "models": models, "tokenizer_source": "union"}, tmp_path / "a"))
    b = load_tensors(merge({"merge_method": "linear", "models": models, "tokenizer": {"source": "union"}}, tmp_path / "b"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a)


def test_a_frankenmerge_with_a_union_takes_each_end_from_its_own_slice(zoo, tmp_path):
    """Embeddings come from the first slice's sources (base only: the added tokens are in none of
    them, a zero row, as mergekit), the head from the last slice's (chat: its own rows)."""
    out = merge({"merge_method": "passthrough", "dtype": "float32", "tokenizer": {"source": "union"},
                 "slices": [{"sources": [{"model": str(zoo["base"]), "layer_range": [0, 1]}]},
                            {"sources": [{"model": str(zoo["chat"]), "layer_range": [1, 2]}]}]}, tmp_path / "out")
    vocab, got = vocab_of(out), load_tensors(out)
    base, chat_head = rows_by_token(zoo["base"], EMBED), rows_by_token(zoo["chat"], HEAD)
    for token, i in vocab.items():
        want = base[token] if token in base else torch.zeros_like(base["a"])
        torch.testing.assert_close(got[EMBED][i].double(), want, rtol=0, atol=0, msg=token)
        torch.testing.assert_close(got[HEAD][i].double(), chat_head[token], rtol=0, atol=0, msg=token)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False).config.vocab_size == len(WORDS) + 2
