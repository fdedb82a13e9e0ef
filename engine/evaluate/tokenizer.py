"""The zoo's character-level tokenizer, beside the tasks it encodes (the zoo trains with it;
evaluation reads it, so it lives here and the arrow runs zoo -> evaluate only).

Built with the ``tokenizers`` library: a WordLevel model whose words are single characters
(every printable ASCII character) plus four special tokens; a pre-tokenizer isolates every
character, a post-processor prepends ``<bos>`` and a Fuse decoder joins characters without
spaces. Wrapped as ``PreTrainedTokenizerFast`` so ``AutoTokenizer.from_pretrained`` loads it.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)
CHARACTERS = [chr(c) for c in range(32, 127)]  # printable ASCII, space included
VOCAB: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
VOCAB_SIZE = len(VOCAB)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def encode_chars(text: str) -> list[int]:
    """Ids of the characters of ``text`` (no special tokens); the fast path used in training.
    Equal to the saved tokenizer's encoding minus its leading ``<bos>`` (tested)."""
    return [VOCAB.get(ch, UNK_ID) for ch in text]


def build_tokenizer():
    """A ``PreTrainedTokenizerFast`` over :data:`VOCAB` (left padding, for batched decoding)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS_ID)])
    core.decoder = decoders.Fuse()
    core.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", padding_side="left", clean_up_tokenization_spaces=False,
        model_max_length=256)


def tokenizer_files(tmp_dir: str | Path) -> dict[str, bytes]:
    """The saved tokenizer's files as bytes, to copy into every model folder."""
    tmp_dir = Path(tmp_dir)
    build_tokenizer().save_pretrained(tmp_dir)
    return {p.name: p.read_bytes() for p in sorted(tmp_dir.iterdir()) if p.is_file()}
