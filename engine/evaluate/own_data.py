"""Evaluation on the user's own files: JSONL question/answer sets and plain-text documents.

A JSONL line is ``{"prompt": str, "answer": str}``. Scoring, as a plain ``generate()`` loop
would do it: the prompt is encoded as the model's tokenizer encodes it by default (special
tokens included; optionally wrapped in the tokenizer's chat template); greedy decoding of at
most the answer's token count + 4 new tokens; the continuation is cut at EOS, decoded, cut at
its first newline and stripped; exact match against the stripped answer. Rows are decoded in
batches with a KV cache (``greedy_decode``: padding is invisible, so a row decodes as alone)
with the batch's largest budget, and each row is cut to its own budget (greedy decoding is a
prefix of itself, so this equals decoding the row with its own budget).

A text file holds one document per line. A document longer than the model's context is cut
into non-overlapping windows of the context length; perplexity is
``exp(total next-token loss / predicted tokens)`` over every window of every document.

Every file is hostile: read as bytes with a size cap, UTF-8 decoded, each JSON line parsed by
the strict parser (duplicate keys refused), every problem a one-line ``ConfigError`` naming the
file and line. ``split`` keeps the dev or held-out half by a stable hash of the prompt (our
rule: half and half, so small files still have both; the zoo's tasks hold out one in eight).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from engine.errors import ConfigError, ParameterError
from engine.evaluate.decode import greedy_decode
from engine.io.header import DuplicateKeyError, loads_strict_json

MAX_FILE_BYTES = 256 * 2**20
MAX_LINE_BYTES = 1 * 2**20       # one example or one document
EXTRA_NEW_TOKENS = 4
Split = Literal["all", "dev", "heldout"]


def split_of(text: str) -> str:
    """``dev`` or ``heldout`` for an example keyed by ``text`` (its prompt, or a document)."""
    return "heldout" if hashlib.sha256(f"evalset:{text}".encode()).digest()[0] < 128 else "dev"


@dataclass
class EvalSet:
    """One file's examples (``kind="qa"``) or documents (``kind="text"``)."""

    name: str
    path: Path
    kind: Literal["qa", "text"]
    examples: list[tuple[str, str]] = field(default_factory=list)
    documents: list[str] = field(default_factory=list)

    def split(self, which: Split) -> "EvalSet":
        if which == "all":
            return self
        keep = (lambda key: split_of(key) == which)
        return EvalSet(self.name, self.path, self.kind,
                       [e for e in self.examples if keep(e[0])], [d for d in self.documents if keep(d)])

    def __len__(self) -> int:
        return len(self.examples) if self.kind == "qa" else len(self.documents)


def _lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the non-blank lines of a UTF-8 file, within the size caps."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise ConfigError("not a regular file", path=path)
        if size > MAX_FILE_BYTES:
            raise ConfigError(f"file is {size} bytes; at most {MAX_FILE_BYTES} are read", path=path)
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read: {err.strerror or err}", path=path) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ConfigError(f"line {line} is not UTF-8 text", path=path) from None
    out = []
    for number, line in enumerate(text.split("\n"), start=1):
        if len(line.encode("utf-8")) > MAX_LINE_BYTES:
            raise ConfigError(f"line {number} is {len(line.encode('utf-8'))} bytes; a line is at "
                              f"most {MAX_LINE_BYTES}", path=path)
        if line.strip():
            out.append((number, line.rstrip("\r")))
    if not out:
        raise ConfigError("the file is empty", path=path)
    return out


def read_jsonl(path: str | Path) -> EvalSet:
    """A question/answer set; see the module docstring for the rules."""
    path = Path(path)
    examples = []
    for number, line in _lines(path):
        try:
            row = loads_strict_json(line)
        except DuplicateKeyError as dup:
            raise ConfigError(f"line {number}: duplicate key {dup.key!r}", path=path) from None
        except (ValueError, RecursionError) as err:
            raise ConfigError(f"line {number} is not valid JSON: {str(err)[:80]}", path=path) from None
        if not isinstance(row, dict):
            raise ConfigError(f"line {number} is not a JSON object", path=path)
        for key in ("prompt", "answer"):
            if not isinstance(row.get(key), str):
                what = "missing" if key not in row else f"not a string ({type(row[key]).__name__})"
                raise ConfigError(f"line {number}: {key!r} is {what}", path=path)
        if not row["answer"].strip():
            raise ConfigError(f"line {number}: 'answer' is blank", path=path)
        examples.append((row["prompt"], row["answer"]))
    return EvalSet(path.stem, path, "qa", examples=examples)


def read_text(path: str | Path) -> EvalSet:
    """A document set (one document per non-blank line)."""
    path = Path(path)
    return EvalSet(path.stem, path, "text", documents=[line for _, line in _lines(path)])


TEXT_SUFFIXES = (".txt", ".text")


def read_eval_file(path: str | Path) -> EvalSet:
    """A text file (``.txt``: documents) or a JSONL file (anything else: prompt/answer)."""
    return (read_text if Path(path).suffix.lower() in TEXT_SUFFIXES else read_jsonl)(path)


def heldout_sets(paths, zoo_tasks: list[str] | None = None, *, split: Split = "heldout") -> list[EvalSet]:
    """The held-out half of each file, for scoring merges and rebuilds (the dev half is for
    calibration and tuning: ``split="dev"`` gives it instead). A stem that names a zoo task being scored (``zoo_tasks``: None =
    every zoo task), or another file, is refused: results are keyed by it."""
    from engine.evaluate.tasks import TASK_NAMES

    sets: list[EvalSet] = []
    zoo = set(TASK_NAMES if zoo_tasks is None else zoo_tasks)
    for path in paths:
        evalset = read_eval_file(path)
        if evalset.kind == "qa" and evalset.name in zoo:
            raise ParameterError(f"eval file stem {evalset.name!r} is also a zoo task; rename the file",
                                 path=path)
        if any(s.name == evalset.name for s in sets):
            raise ParameterError(f"two eval files share the stem {evalset.name!r}", path=path)
        heldout = evalset.split(split)
        if len(heldout) == 0:
            half = "held-out" if split == "heldout" else split
            raise ParameterError(f"no line falls in the {half} half; add lines", path=path)
        sets.append(heldout)
    return sets


def _context_length(model) -> int:
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 1:
            return value
    raise ParameterError("the model's config names no context length")


def _prompt_ids(tokenizer, prompt: str, chat_template: bool) -> list[int]:
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ParameterError("--chat-template: the tokenizer has no chat template")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return list(tokenizer(prompt)["input_ids"])


def continuation_text(tokenizer, tokens: list[int]) -> str:
    """Generated tokens -> the compared text: cut at EOS, decoded, cut at the first newline,
    stripped."""
    eos = tokenizer.eos_token_id
    if eos is not None and eos in tokens:
        tokens = tokens[:tokens.index(eos)]
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return text.split("\n", 1)[0].strip()


@torch.no_grad()
def score_qa(model, tokenizer, examples: list[tuple[str, str]], *, chat_template: bool = False,
             batch_size: int = 64) -> dict:
    """``{"accuracy", "n"}`` of exact matches (see the module docstring)."""
    if not examples:
        raise ParameterError("no examples to score")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    prompts = [_prompt_ids(tokenizer, p, chat_template) for p, _ in examples]
    if any(not p for p in prompts):
        raise ParameterError("a prompt encodes to no tokens (an empty prompt needs a BOS token)")
    budgets = [len(tokenizer(a, add_special_tokens=False)["input_ids"]) + EXTRA_NEW_TOKENS
               for _, a in examples]
    limit = _context_length(model)
    order = sorted(range(len(examples)), key=lambda i: (len(prompts[i]), budgets[i]))
    correct = 0
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        budget = max(budgets[i] for i in rows)
        if max(len(prompts[i]) for i in rows) + budget > limit:
            budget = max(1, limit - max(len(prompts[i]) for i in rows))
        decoded = greedy_decode(model, [prompts[i] for i in rows], budget,
                                eos_id=eos if eos is not None else -1, pad_id=pad,
                                batch_size=len(rows))
        for i, tokens in zip(rows, decoded):
            text = continuation_text(tokenizer, tokens[:budgets[i]])
            correct += text == examples[i][1].strip()
    return {"accuracy": correct / len(examples), "n": len(examples)}


@torch.no_grad()
def perplexity(model, tokenizer, documents: list[str], *, batch_size: int = 16) -> float:
    """exp(total next-token loss / predicted tokens) over context-length windows."""
    ctx = _context_length(model)
    windows = []
    for doc in documents:
        ids = list(tokenizer(doc)["input_ids"])
        windows.extend(ids[i:i + ctx] for i in range(0, len(ids), ctx))
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise ParameterError("no document has two tokens to score")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count = 0.0, 0
    windows.sort(key=len)
    for start in range(0, len(windows), batch_size):
        rows = windows[start:start + batch_size]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):  # right padding: causal attention never looks ahead
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
        keep = mask[:, 1:].bool()
        total += float(nll[keep].double().sum())
        count += int(keep.sum())
    return math.exp(total / count)


def score_sets(model, tokenizer, sets: list[EvalSet], *, chat_template: bool = False) -> dict:
    """``{"tasks": {name: {"accuracy", "n"}}, "perplexity": {name: float}}``."""
    names = [s.name for s in sets]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ParameterError(f"two eval files share the name {dup!r} (the file stem names the result)")
    was_training = model.training
    model.eval()
    try:
        tasks = {s.name: score_qa(model, tokenizer, s.examples, chat_template=chat_template)
                 for s in sets if s.kind == "qa"}
        ppl = {s.name: perplexity(model, tokenizer, s.documents) for s in sets if s.kind == "text"}
    finally:
        model.train(was_training)
    return {"tasks": tasks, "perplexity": ppl}
