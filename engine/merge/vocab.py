"""Merged tokenizers: mergekit's ``tokenizer`` / ``tokenizer_source``, embedding rows by token.

With a tokenizer section, the output vocabulary is built first and every model's embedding and
head rows are moved to it by token string before the method merges them, so a fine-tune that
added tokens (vocab V + 2 against the base's V) merges with each token's row where it belongs.
As mergekit 0.1.5 (mergekit/tokenizer/build.py, embed.py):

  - ``source: base`` is the base model's tokenizer (the recipe's ``base_model``, else its first
    model); a model path is that model's; ``union`` (the default of a ``tokenizer`` mapping) is
    the base's plus, in model order, every token another model has and it lacks, then every
    added (special) token of any model; ``tokens`` names are added when missing;
  - a model's rows are its own where it has the token (ids at or beyond its embedding's rows are
    not its tokens); where it lacks it, the token's row is taken, in this order, from the
    ``tokens`` entry (``{kind: zero}``, a model path: that model's row, ``{kind: model_token,
    model, token | token_id}``: a given row of that model), from the one model that has it, from
    the base when the base has it, else the mean of the rows of the models that have it (zero
    when none does); ``force: true`` puts the entry's row in every model, even those that have
    the token;
  - ``pad_to_multiple_of`` rounds the row count up, each model's extra rows being the mean of its
    real ones; the config's ``vocab_size`` is the new row count.

Ours: a union of tokenizers of different types (BPE with WordLevel, ...) is refused, where
mergekit writes a tokenizer whose ids mean nothing to half the models; a ``tokens`` entry
naming a model that is not merged is refused before any work (mergekit fails mid-merge); an
entry without a source falls back to the rules above (mergekit raises).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.compat import vocab_size
from engine.errors import ConfigError
from engine.io.side_files import read_side_files

TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json")
# Named chat templates (ours, written from each format's published description).
CHAT_TEMPLATES = {
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
               "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    "llama3": ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
               "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
               "{% endif %}"),
    "alpaca": ("{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + "
               "'\\n\\n' }}{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + "
               "'\\n\\n' }}{% else %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
               "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"),
}


def has_tokenizer(path: Path) -> bool:
    return any((Path(path) / name).is_file() for name in TOKENIZER_MARKERS)


def tokenizer_path(folder) -> Path:
    """Where a model folder's tokenizer lives: a LoRA adapter's own, else its base's."""
    base = getattr(folder, "base", None)
    if base is not None and not has_tokenizer(folder.path):
        return base.path
    return folder.path


def _load(path: Path, key: str):
    from engine.evaluate.loading import load_tokenizer

    try:
        return load_tokenizer(path)
    except ConfigError as err:
        raise ConfigError(f"recipe key {key}: {err.reason}", path=path) from None


def _kind(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return type(backend.model).__name__ if backend is not None else type(tokenizer).__name__


@dataclass
class RowRule:
    """Where a token's row comes from when a model lacks it (or ``force``)."""

    kind: str                 # "zero" | "model" (that model's row of the token) | "row" (a fixed row)
    model: int | None = None  # index into the inputs
    row: int | None = None
    force: bool = False


@dataclass
class VocabPlan:
    files: dict[str, bytes]                    # the merged tokenizer's files
    tokens: list[str]                          # output id -> token
    rows: int                                  # output rows (tokens, padded)
    perms: dict[int, torch.Tensor]             # id(folder) -> (len(tokens),) its row or -1
    base_key: int | None                       # id(folder) of the tokenizer base
    rules: dict[int, tuple[str, dict]] = field(default_factory=dict)  # output id -> (kind, spec)
    forced: frozenset[int] = frozenset()
    warnings: list[str] = field(default_factory=list)

    def is_identity(self) -> bool:
        """Whether every model keeps its own rows in place (same tokens, same ids, no padding,
        nothing forced)."""
        ids = torch.arange(len(self.tokens))
        return (self.rows == len(self.tokens) and not self.forced
                and all(p.shape == ids.shape and torch.equal(p, ids) for p in self.perms.values()))

    def permute(self, inputs: Sequence[tuple[object, torch.Tensor]]) -> list[torch.Tensor]:
        """Every input's vocabulary tensor (rows = tokens) on the output vocabulary: its own row
        where it has the token and nothing forces another, else the rule's row (see the module
        doc), computed in float32 (float64 for float64 inputs)."""
        dtype = torch.float64 if any(t.dtype == torch.float64 for _, t in inputs) else torch.float32
        keys = [id(folder) for folder, _ in inputs]
        tensors = [t.to(dtype) for _, t in inputs]
        n = len(self.tokens)
        perms = [self.perms[k] for k in keys]
        present = torch.stack([p >= 0 for p in perms])            # (models, tokens)
        shape = tensors[0].shape[1:]
        defaults: dict[int, torch.Tensor] = {}
        needs = (~present.all(0)).nonzero().flatten().tolist()
        for token_id in sorted(set(needs) | set(self.forced)):
            rule = self.rules.get(token_id)
            if rule is not None:
                defaults[token_id] = self._rule_row(rule, keys, tensors, perms, token_id, shape, dtype)
                continue
            have = present[:, token_id].nonzero().flatten().tolist()
            if len(have) == 1:
                defaults[token_id] = tensors[have[0]][perms[have[0]][token_id]]
            elif not have:
                defaults[token_id] = torch.zeros(shape, dtype=dtype)
            elif self.base_key in keys and bool(present[keys.index(self.base_key), token_id]):
                b = keys.index(self.base_key)
                defaults[token_id] = tensors[b][perms[b][token_id]]
            else:  # the mean of the models that have it, summed in model order
                acc = torch.zeros(shape, dtype=dtype)
                for m in have:
                    acc = acc + tensors[m][perms[m][token_id]]
                defaults[token_id] = acc / len(have)
        out = []
        for t, p in zip(tensors, perms):
            new = torch.zeros((self.rows, *shape), dtype=dtype)
            own = (p >= 0).clone()
            if self.forced:
                own[list(self.forced)] = False
            idx = own.nonzero().flatten()
            new[idx] = t[p[idx]]
            for token_id, row in defaults.items():
                if not bool(own[token_id]):
                    new[token_id] = row
            if self.rows > n:  # padding rows: the mean of the real ones (mergekit's)
                new[n:] = new[:n].mean(dim=0)
            out.append(new)
        return out

    def _rule_row(self, rule, keys, tensors, perms, token_id, shape, dtype) -> torch.Tensor:
        kind, spec = rule
        if kind == "zero":
            return torch.zeros(shape, dtype=dtype)
        if spec["key"] not in keys:
            raise ConfigError(f"recipe key {spec['recipe_key']}: model {spec['model']} is not an "
                              "input of this tensor's merge")
        m = keys.index(spec["key"])
        if kind == "row":
            return tensors[m][spec["row"]]
        if int(perms[m][token_id]) < 0:
            raise ConfigError(f"recipe key {spec['recipe_key']}: model {spec['model']} has no token "
                              f"{self.tokens[token_id]!r}")
        return tensors[m][perms[m][token_id]]


def build_vocab_plan(recipe, inputs: Sequence[tuple[str, object]], base_folder, *, resolve,
                     source_folder=None, base_model=None) -> VocabPlan:
    """The output tokenizer and each input's row map. ``inputs``: (recipe key, folder) of every
    model whose vocabulary tensors are merged; ``base_folder``: the tokenizer base (the
    ``base_model``, else the first model); ``base_model``: the recipe's base folder, whose row a
    token missing elsewhere takes (None without one: the mean, as mergekit);
    ``source_folder``: the folder a model-path ``source`` names; ``resolve(ref, key)``: a recipe
    reference to a resolved path (the recipe's path rules). Raises before any work."""
    settings = recipe.tokenizer
    source = recipe.tokenizer_model()
    add = dict(settings.tokens or {}) if settings is not None else {}
    pad = settings.pad_to_multiple_of if settings is not None else None
    warnings: list[str] = []
    key_of = {id(f): k for k, f in inputs}
    folders = {id(f): f for _, f in inputs}
    if id(base_folder) not in folders:
        folders[id(base_folder)] = base_folder
        key_of[id(base_folder)] = "base_model"
    if not has_tokenizer(tokenizer_path(base_folder)):
        raise ConfigError(f"recipe key {key_of[id(base_folder)]}: the tokenizer base has no tokenizer "
                          "files (tokenizer.json / tokenizer_config.json)", path=base_folder.path)
    loaded, vocabs, sizes = {}, {}, {}
    for k, folder in folders.items():
        path = tokenizer_path(folder)
        if has_tokenizer(path):
            loaded[k] = _load(path, key_of[k])
        else:  # mergekit: a model whose tokenizer cannot be loaded has the base's
            warnings.append(f"{folder.path}: no tokenizer; taken to be the base's")
        sizes[k] = vocab_size(folder)
    base_tok = loaded[id(base_folder)]
    for k in folders:
        vocabs[k] = (loaded.get(k) or base_tok).get_vocab()
    if source == "union":
        kinds = {k: _kind(tok) for k, tok in loaded.items()}
        if len(set(kinds.values())) > 1:
            listed = ", ".join(f"{kinds[k]} ({folders[k].path})" for k in kinds)
            raise ConfigError(f"recipe key {'tokenizer.source' if settings else 'tokenizer_source'}: "
                              f"a union of tokenizers of different types: {listed}")
        out_tok = _union(base_tok, [(loaded[k], sizes[k]) for k in loaded], sizes[id(base_folder)])
    elif source == "base":
        out_tok = _copy(base_tok)
    else:
        out_tok = _copy(_load(tokenizer_path(source_folder), "tokenizer.source" if settings else
                              "tokenizer_source"))
    existing = set(out_tok.get_vocab())
    for token in add:
        if token not in existing:
            out_tok.add_tokens(token)
            existing.add(token)
    vocab = out_tok.get_vocab()
    tokens = [None] * len(vocab)
    for token, i in vocab.items():
        if i >= len(tokens):
            raise ConfigError(f"the merged tokenizer's ids are not contiguous (token {token!r} has id {i})")
        tokens[i] = token
    perms = {}
    for k in folders:
        theirs, limit = vocabs[k], sizes[k] if sizes[k] is not None else len(vocabs[k])
        perms[k] = torch.tensor([theirs.get(t, -1) if theirs.get(t, -1) < limit else -1 for t in tokens],
                                dtype=torch.long)
    rules, forced = {}, set()
    for token, entry in add.items():
        token_id = vocab[token]
        rule = _rule(token, entry, folders, vocabs, resolve)
        if rule is not None:
            rules[token_id] = rule
        if entry.force:
            if rule is None:
                raise ConfigError(f"recipe key tokenizer.tokens[{token!r}]: force needs a source")
            forced.add(token_id)
    rows = len(tokens)
    if pad and rows % pad:
        rows += pad - rows % pad
    _apply_chat_template(out_tok, recipe, folders, loaded)
    return VocabPlan(files=_save(out_tok), tokens=tokens, rows=rows, perms=perms,
                     base_key=id(base_model) if base_model is not None else None, rules=rules, forced=frozenset(forced), warnings=warnings)


def _copy(tokenizer):
    """A private copy (save and reload), so adding tokens never changes a loaded one."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="delta-workbench-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        return AutoTokenizer.from_pretrained(tmp, trust_remote_code=False, local_files_only=True)


def _union(base_tok, others, base_rows):
    """The base's tokenizer, then every other token (below each model's embedding rows) it lacks,
    then every added token of every model (first settings win), as mergekit."""
    out = _copy(base_tok)
    base_vocab = base_tok.get_vocab()
    plain: dict[str, None] = {}
    added: dict[str, object] = {}
    for tok, rows in [(base_tok, base_rows), *others]:
        limit = rows if rows is not None else len(tok.get_vocab())
        decoder = tok.added_tokens_decoder
        names = {info.content for info in decoder.values()}
        for token, idx in sorted(tok.get_vocab().items(), key=lambda item: item[1]):  # ours: id order
            if idx < limit and token not in names:
                plain.setdefault(token, None)
        for idx, info in decoder.items():
            if idx < limit:
                added.setdefault(info.content, info)
    for token in plain:
        if token not in added and token not in base_vocab:
            out.add_tokens(token)
    for info in added.values():
        out.add_tokens(info)
    return out


def _rule(token, entry, folders, vocabs, resolve):
    """A ``tokens`` entry as (kind, spec), or None (no source: the automatic rules)."""
    where = f"tokenizer.tokens[{token!r}].source"
    src = entry.source
    if src is None:
        return None
    if getattr(src, "kind", None) == "zero":
        return ("zero", {})
    ref = src if isinstance(src, str) else src.model
    path = Path(resolve(ref, where)).resolve()
    match = [k for k, f in folders.items() if Path(f.path).resolve() == path]
    if not match:
        raise ConfigError(f"recipe key {where}: {ref} is not one of the merged models")
    spec = {"key": match[0], "model": ref, "recipe_key": where}
    if isinstance(src, str):
        return ("model", spec)
    if src.token_id is not None:
        row = src.token_id
    else:
        if src.token not in vocabs[match[0]]:
            raise ConfigError(f"recipe key {where}: {ref} has no token {src.token!r}")
        row = vocabs[match[0]][src.token]
    rows = vocab_size(folders[match[0]])
    if not 0 <= row < (rows if rows is not None else row + 1):
        raise ConfigError(f"recipe key {where}: token id {row} is outside {ref}'s {rows} rows")
    return ("row", {**spec, "row": row})


def _apply_chat_template(tokenizer, recipe, folders, loaded) -> None:
    """mergekit's ``chat_template``: ``auto`` (the template most inputs share), a name, or a
    Jinja template itself."""
    template = recipe.chat_template
    if not template:
        return
    if template == "auto":
        found = [tok.chat_template.strip() for tok in loaded.values()
                 if isinstance(getattr(tok, "chat_template", None), str) and tok.chat_template.strip()]
        if not found:
            return
        template = max(found, key=found.count)  # the plurality; ties go to the first seen
    elif template in CHAT_TEMPLATES:
        template = CHAT_TEMPLATES[template]
    elif "{" not in template or len(template) < 20:
        raise ConfigError(f"recipe key chat_template: {template!r} is neither 'auto', a known "
                          f"template ({', '.join(sorted(CHAT_TEMPLATES))}) nor a Jinja template")
    tokenizer.chat_template = template


def retemplated_files(folder, recipe, inputs: Sequence) -> dict[str, bytes]:
    """Without a merged vocabulary: the tokenizer source's tokenizer with the recipe's
    ``chat_template`` (``auto``: the one most of ``inputs`` share), saved again; nothing when the
    source has no tokenizer."""
    path = tokenizer_path(folder)
    if not has_tokenizer(path):
        return {}
    tokenizer = _load(path, "chat_template")
    loaded = {id(f): _load(tokenizer_path(f), "chat_template") for f in inputs
              if has_tokenizer(tokenizer_path(f))}
    _apply_chat_template(tokenizer, recipe, {}, loaded)
    return _save(tokenizer)


def _save(tokenizer) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory(prefix="delta-workbench-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        return read_side_files(Path(tmp), [p.name for p in sorted(Path(tmp).iterdir())])


__all__ = ["CHAT_TEMPLATES", "VocabPlan", "build_vocab_plan", "has_tokenizer", "retemplated_files",
           "tokenizer_path"]
