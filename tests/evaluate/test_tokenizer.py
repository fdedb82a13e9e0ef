import random

from engine.evaluate.tokenizer import (BOS_ID, CHARACTERS, EOS_ID, PAD_ID, UNK_ID, VOCAB_SIZE,
                                  build_tokenizer, encode_chars, tokenizer_files)


def _random_text(rng: random.Random) -> str:
    return "".join(rng.choice(CHARACTERS) for _ in range(rng.randint(0, 40)))


def test_round_trip_and_fast_path_agree():
    tok = build_tokenizer()
    rng = random.Random(0)
    for _ in range(200):
        text = _random_text(rng)
        ids = tok(text)["input_ids"]
        assert ids[0] == BOS_ID and len(ids) == len(text) + 1  # one token per character
        assert ids[1:] == encode_chars(text)
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(tok) == VOCAB_SIZE
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)


def test_unknown_characters_map_to_unk():
    tok = build_tokenizer()
    assert tok("a\u00e9\nb", add_special_tokens=False)["input_ids"] == [
        encode_chars("a")[0], UNK_ID, UNK_ID, encode_chars("b")[0]]
    assert encode_chars("\u00e9") == [UNK_ID]


def test_saved_tokenizer_reloads_offline_with_autotokenizer(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = tokenizer_files(tmp_path / "saved")
    assert "tokenizer.json" in files and "tokenizer_config.json" in files
    folder = tmp_path / "copy"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    loaded = AutoTokenizer.from_pretrained(folder)
    rng = random.Random(1)
    texts = [_random_text(rng) for _ in range(50)]
    assert [loaded(t)["input_ids"] for t in texts] == [[BOS_ID] + encode_chars(t) for t in texts]
    batch = loaded(["ab", "abcd"], padding=True)
    assert batch["input_ids"][0][:2] == [PAD_ID, PAD_ID]  # left padding for decoding
    assert batch["attention_mask"][0] == [0, 0, 1, 1, 1]
