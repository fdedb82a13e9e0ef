"""Multi-stage recipes: mergekit-multi's format, several merges in one YAML stream.

Each ``---`` separated document is a merge recipe; a document with a ``name`` is an
intermediate merge, the one without is the final merge written to ``--out`` (as
``mergekit-multi``, mergekit/scripts/multimerge.py 0.1.5). A later recipe uses an earlier
merge by writing its name where a model path goes (``base_model``, ``models[].model``, slice
sources, tokenizer sources, ``BASE+ADAPTER``'s base). Merges run in dependency order; the
intermediate results live in a private staging folder (registered like every staging folder, so
a killed run's leftovers are swept at the next start) and are removed at the end, whatever
happens. Only the final model is published, atomically, like any merge.

Checked before any merge runs: every document parses, names are unique, exactly one document is
unnamed, no merge depends on itself (directly or through others), and every model path that is
not a merge's name resolves (the recipe's path rules).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

from engine.errors import ConfigError
from engine.recipe import MergeRecipe, parse_recipe, resolve_model_ref, split_lora_ref
from engine.textparse import MAX_TEXT_BYTES, parse_yaml_documents


def read_documents(path: str | Path) -> list[Any]:
    """The YAML documents of a recipe file (one for a plain recipe), read by the strict loader."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_TEXT_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"cannot read recipe: {err.strerror or err}", path=path) from None
    return [d for d in parse_yaml_documents(raw, source=str(path)) if d is not None]


def _model_slots(data: dict) -> list[tuple[str, dict, str]]:
    """(recipe key, the mapping holding it, its field) of every model reference in a raw recipe."""
    slots = []
    if isinstance(data.get("base_model"), str):
        slots.append(("base_model", data, "base_model"))
    for i, entry in enumerate(data.get("models") or []):
        if isinstance(entry, dict) and isinstance(entry.get("model"), str):
            slots.append((f"models[{i}].model", entry, "model"))
    for i, piece in enumerate(data.get("slices") or []):
        if not isinstance(piece, dict):
            continue
        if isinstance(piece.get("base_model"), str):
            slots.append((f"slices[{i}].base_model", piece, "base_model"))
        for j, src in enumerate(piece.get("sources") or []):
            if isinstance(src, dict) and isinstance(src.get("model"), str):
                slots.append((f"slices[{i}].sources[{j}].model", src, "model"))
    if isinstance(data.get("tokenizer_source"), str):
        slots.append(("tokenizer_source", data, "tokenizer_source"))
    tokenizer = data.get("tokenizer")
    if isinstance(tokenizer, dict):
        if isinstance(tokenizer.get("source"), str):
            slots.append(("tokenizer.source", tokenizer, "source"))
        for token, entry in (tokenizer.get("tokens") or {}).items():
            if not isinstance(entry, dict):
                continue
            if isinstance(entry.get("source"), str):
                slots.append((f"tokenizer.tokens[{token!r}].source", entry, "source"))
            elif isinstance(entry.get("source"), dict) and isinstance(entry["source"].get("model"), str):
                slots.append((f"tokenizer.tokens[{token!r}].source.model", entry["source"], "model"))
    return slots


def _named(ref: str, names: set[str]) -> str | None:
    """The merge name a reference uses (itself, or the base of ``NAME+ADAPTER``), else None."""
    if ref in names:
        return ref
    if "+" in ref:
        base = ref.rpartition("+")[0]
        return base if base in names else None
    return None


def plan_stages(docs: list[Any], *, source: str = "recipe", recipe_dir: str | Path | None = None,
                allowed_roots: Iterable[str | Path] | None = None) -> list[tuple[str | None, dict, set[str]]]:
    """(name, raw recipe, the merges it uses) in the order to run them, the final one last (every
    named merge runs, whether the final one uses it or not, as mergekit-multi); every check of
    the module doc done."""
    stages: dict[str | None, dict] = {}
    for k, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise ConfigError(f"document {k + 1} is not a merge recipe (a YAML mapping)", path=source)
        name = doc.get("name")
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise ConfigError(f"document {k + 1}: name must be a non-empty string", path=source)
        if name in stages:
            raise ConfigError("two final merges (documents without a name)" if name is None
                              else f"two merges named {name!r}", path=source)
        parse_recipe(doc, source=f"{source} ({name or 'final merge'})")  # every document valid now
        stages[name] = doc
    if None not in stages:
        raise ConfigError("no final merge: one document must have no name (it is written to --out)",
                          path=source)
    names = {n for n in stages if n is not None}
    uses: dict[str | None, set[str]] = {}
    roots = list(allowed_roots) if allowed_roots is not None else None
    for name, doc in stages.items():
        uses[name] = set()
        for key, holder, field in _model_slots(doc):
            used = _named(holder[field], names)
            where = f"{name or 'final merge'}: {key}"
            if used is not None:
                uses[name].add(used)
                continue
            for part in filter(None, split_lora_ref(holder[field])):
                resolve_model_ref(part, key=where, recipe_dir=recipe_dir, allowed_roots=roots)
    order: list[str | None] = []
    state: dict[str | None, str] = {}

    def visit(name, chain):
        if state.get(name) == "done":
            return
        if state.get(name) == "open":
            loop = " -> ".join(str(n) for n in [*chain[chain.index(name):], name])
            raise ConfigError(f"merges depend on each other in a loop: {loop}", path=source)
        state[name] = "open"
        for dep in sorted(uses[name]):
            visit(dep, [*chain, name])
        state[name] = "done"
        order.append(name)

    for name in [n for n in stages if n is not None] + [None]:
        visit(name, [])
    return [(name, stages[name], uses[name]) for name in order]


def _substitute(doc: dict, paths: dict[str, Path]) -> dict:
    import copy

    out = copy.deepcopy(doc)
    out.pop("name", None)
    for _, holder, field in _model_slots(out):
        ref = holder[field]
        if ref in paths:
            holder[field] = str(paths[ref])
        elif "+" in ref and ref.rpartition("+")[0] in paths:
            base, _, adapter = ref.rpartition("+")
            holder[field] = f"{paths[base]}+{adapter}"
    return out


def run_multistage(docs: list[Any], out: str | Path, *, source: str = "recipe",
                   recipe_dir: str | Path | None = None,
                   allowed_roots: Iterable[str | Path] | None = None,
                   progress: Callable[[float, str], None] | None = None, **merge_kw):
    """Run every merge of a multi-stage recipe; the final one into ``out`` (atomic). Returns
    (the final MergeResult, the names of the intermediate merges run)."""
    from engine.io.staging import discard_staging, make_scratch_dir
    from engine.merge.executor import run_merge

    roots = list(allowed_roots) if allowed_roots is not None else None
    stages = plan_stages(docs, source=source, recipe_dir=recipe_dir, allowed_roots=roots)
    scratch = make_scratch_dir("multistage")
    paths: dict[str, Path] = {}
    try:
        result = None
        for k, (name, doc, _) in enumerate(stages):
            recipe: MergeRecipe = parse_recipe(_substitute(doc, paths),
                                               source=f"{source} ({name or 'final merge'})")
            target = Path(out) if name is None else scratch / f"stage-{k}"

            def stage_progress(fraction, label, k=k, name=name):
                if progress is not None:
                    progress((k + fraction) / len(stages), f"{name or 'final'}: {label}")

            result = run_merge(recipe, target, recipe_dir=recipe_dir, progress=stage_progress,
                               allowed_roots=None if roots is None else [*roots, scratch], **merge_kw)
            if name is not None:
                paths[name] = target
        return result, [name for name, _, _ in stages if name is not None]
    finally:
        discard_staging(scratch, [])


__all__ = ["plan_stages", "read_documents", "run_multistage"]
