"""Side-by-side parity with mergekit: the same YAML recipes through `mergekit-yaml` and ours.

Builds tiny random Llama, GPT-2 (Conv1D weights, tied embeddings) and Qwen2 (q/k/v biases,
tied embeddings) families (a base and three fine-tunes each: base + small random deltas,
bf16 safetensors written by transformers' save_pretrained), runs every recipe below through
mergekit's command line and through ours (`python -m engine merge`), and compares tensors:

- deterministic methods (linear, task_arithmetic, slerp, model_stock, dare at density 1, nuslerp,
  multislerp, karcher, sce, arcee_fusion, nearswap, ram, ramplus_tl): every entry equal up to
  bf16 rounding (|diff| <= 1 bf16 ulp of the larger value);
- magnitude-trimming methods (ties, breadcrumbs, breadcrumbs_ties): the fraction of entries
  beyond 1 ulp, each of which must lie where some model's |delta| equals its trim threshold
  (bf16 deltas tie often; mergekit breaks magnitude ties arbitrarily, we keep the lower index);
- frankenmerges (`slices` of layer ranges) and tokenizer unions: exact, as above;
- random-drop methods (dare_*, della*): the masks come from different generators, so entries
  cannot match; compared instead are the fraction of entries the merge changes relative to
  the base (how many survive the drops) and the L2 norm of the merged task vector, per tensor
  ours over mergekit's (mean weighted by entries).

Both outputs are also loaded with transformers' AutoModelForCausalLM and run once.

mergekit is NOT a dependency of the project: install it into a separate virtual environment
(see bench/README.md) and pass its `mergekit-yaml` with --mergekit (or $MERGEKIT_YAML).

    python bench/mergekit_parity.py --mergekit /path/to/venv/bin/mergekit-yaml [--readme]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._common import write_readme_section  # noqa: E402

SECTION = "## mergekit parity"
RESULTS = ROOT / "bench" / "results" / "mergekit_parity.json"


# ---------------------------------------------------------------------- tiny families
def _configs():
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    return {
        "llama": LlamaConfig(vocab_size=160, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        "gpt2": GPT2Config(vocab_size=160, n_embd=64, n_layer=3, n_head=4, n_positions=64,
                           tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
        "qwen2": Qwen2Config(vocab_size=160, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    }


def build_family(arch: str, config, root: Path, n_finetunes: int = 3, seed: int = 0) -> dict[str, Path]:
    """base + fine-tunes (base + N(0, 0.02^2 * scale) deltas, sparse-ish) as bf16 folders."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    folders = {"base": root / arch / "base"}
    base.save_pretrained(folders["base"], safe_serialization=True)
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    for i in range(n_finetunes):
        g = torch.Generator().manual_seed(1000 * (seed + 1) + i)
        model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
        state = {}
        for name, w in base_state.items():
            if not w.is_floating_point():
                state[name] = w
                continue
            w32 = w.float()
            scale = w32.abs().mean().clamp(min=1e-3)
            delta = torch.randn(w.shape, generator=g) * 0.05 * scale
            # some entries move a lot, most a little: realistic for trimming methods
            delta = delta * (1 + 4 * (torch.rand(w.shape, generator=g) < 0.1))
            state[name] = (w32 + delta).to(torch.bfloat16)
        model.load_state_dict(state, strict=False)
        folders[f"ft{i}"] = root / arch / f"ft{i}"
        model.save_pretrained(folders[f"ft{i}"], safe_serialization=True)
    return folders


# ---------------------------------------------------------------------- recipes
def recipes(f: dict[str, Path]) -> dict[str, tuple[str, dict]]:
    """name -> (comparison kind, mergekit recipe). dtype float32: mergekit computes in its
    `dtype` (bf16 arithmetic cancels), we always compute in fp32; both write bf16."""
    base, a, b, c = (str(f[k]) for k in ("base", "ft0", "ft1", "ft2"))
    common = {"dtype": "float32", "out_dtype": "bfloat16"}

    def gta(method, params_a, params_b, extra=None, kind="exact", third=None):
        models = [{"model": a, "parameters": params_a}, {"model": b, "parameters": params_b}]
        if third is not None:
            models.append({"model": c, "parameters": third})
        return kind, {"merge_method": method, "base_model": base, "models": models,
                      "parameters": extra or {}, **common}

    return {
        "linear": ("exact", {"merge_method": "linear", "models": [
            {"model": a, "parameters": {"weight": 0.6}}, {"model": b, "parameters": {"weight": 0.3}},
            {"model": c, "parameters": {"weight": 0.1}}], **common}),
        "task_arithmetic": gta("task_arithmetic", {"weight": 0.7}, {"weight": 0.5}, {"lambda": 0.9},
                               third={"weight": -0.2}),
        "ties": gta("ties", {"weight": 1.0, "density": 0.5}, {"weight": 0.8, "density": 0.7}, kind="trim",
                    third={"weight": 0.5, "density": 0.3}),
        "ties (int8_mask, no normalize)": gta("ties", {"weight": 0.6, "density": 0.4},
                                              {"weight": 0.6, "density": 0.4},
                                              {"int8_mask": True, "normalize": False}, kind="trim"),
        "breadcrumbs": gta("breadcrumbs", {"weight": 0.6, "density": 0.8, "gamma": 0.05},
                           {"weight": 0.4, "density": 0.7, "gamma": 0.02}, kind="trim"),
        "breadcrumbs_ties": gta("breadcrumbs_ties", {"weight": 0.6, "density": 0.8, "gamma": 0.05},
                                {"weight": 0.4, "density": 0.7, "gamma": 0.02}, kind="trim"),
        "dare_linear (density 1)": gta("dare_linear", {"weight": 0.6, "density": 1.0},
                                       {"weight": 0.4, "density": 1.0}),
        "dare_ties (density 1)": gta("dare_ties", {"weight": 0.6, "density": 1.0},
                                     {"weight": 0.4, "density": 1.0}),
        "dare_linear": gta("dare_linear", {"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.5},
                           kind="random"),
        "dare_ties": gta("dare_ties", {"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.5},
                         kind="random"),
        "della": gta("della", {"weight": 0.6, "density": 0.5, "epsilon": 0.1},
                     {"weight": 0.4, "density": 0.5, "epsilon": 0.1}, kind="random"),
        "della_linear": gta("della_linear", {"weight": 0.6, "density": 0.5, "epsilon": 0.1},
                            {"weight": 0.4, "density": 0.5, "epsilon": 0.1}, kind="random"),
        "slerp (gradient, filters)": ("exact", {
            "merge_method": "slerp", "base_model": base,
            "slices": [{"sources": [{"model": base, "layer_range": [0, 3]}, {"model": a, "layer_range": [0, 3]}]}],
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]},
                                 {"filter": "attn", "value": [0, 0.5, 1]},
                                 {"filter": "mlp", "value": [1, 0.5, 0]}, {"value": 0.4}]}, **common}),
        "model_stock": ("exact", {"merge_method": "model_stock", "base_model": base,
                                  "models": [{"model": a}, {"model": b}, {"model": c}], **common}),
        "nuslerp": gta("nuslerp", {"weight": 0.7}, {"weight": 0.3}),
        "nuslerp (rows, no base)": ("exact", {"merge_method": "nuslerp", "models": [
            {"model": a, "parameters": {"weight": 0.4}}, {"model": b, "parameters": {"weight": 0.6}}],
            "parameters": {"nuslerp_flatten": False}, **common}),
        "nuslerp (columns)": gta("nuslerp", {"weight": 0.5}, {"weight": 0.5},
                                 {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
        "multislerp": gta("multislerp", {"weight": 0.5}, {"weight": 0.3}, third={"weight": 0.2}),
        "karcher": ("exact", {"merge_method": "karcher", "models": [{"model": a}, {"model": b}, {"model": c}],
                              **common}),
        "karcher (with base)": ("exact", {"merge_method": "karcher", "base_model": base,
                                          "models": [{"model": a}, {"model": b}], **common}),
        "sce": gta("sce", {}, {}, third={}),
        "sce (select_topk 0.5)": gta("sce", {}, {}, {"select_topk": 0.5}, third={}),
        "arcee_fusion": ("exact", {"merge_method": "arcee_fusion", "base_model": base, "models": [{"model": a}],
                                   **common}),
        "nearswap": ("exact", {"merge_method": "nearswap", "base_model": base, "models": [{"model": a}],
                               "parameters": {"t": 0.001}, **common}),
        "ram": gta("ram", {}, {}, third={}),
        "ramplus_tl": gta("ramplus_tl", {}, {}, {"r": 0.5, "alpha": 0.5}, third={}),
        **slice_recipes(f),
    }


def _src(model: str, lo: int, hi: int, **parameters) -> dict:
    return {"model": model, "layer_range": [lo, hi], **({"parameters": parameters} if parameters else {})}


def slice_recipes(f: dict[str, Path]) -> dict[str, tuple[str, dict]]:
    """Frankenmerges: several slices of layer ranges (half-open, as mergekit)."""
    base, a, b = (str(f[k]) for k in ("base", "ft0", "ft1"))
    common = {"dtype": "float32", "out_dtype": "bfloat16"}
    scale = [{"filter": "o_proj", "value": 0.0}, {"filter": "c_proj", "value": 0.5}, {"value": 1.0}]
    return {
        "slices: passthrough self-merge [0,2]+[1,3]": ("exact", {
            "merge_method": "passthrough", **common,
            "slices": [{"sources": [_src(a, 0, 2)]}, {"sources": [_src(a, 1, 3)]}]}),
        "slices: passthrough of 3 models, scale": ("exact", {
            "merge_method": "passthrough", **common,
            "slices": [{"sources": [_src(a, 0, 2)]}, {"sources": [_src(b, 1, 3, scale=scale)]},
                       {"sources": [_src(base, 2, 3)]}]}),
        "slices: slerp per slice, shifted ranges": ("exact", {
            "merge_method": "slerp", "base_model": a, **common,
            "parameters": {"t": [{"filter": "mlp", "value": [0.2, 0.8]}, {"value": 0.5}]},
            "slices": [{"sources": [_src(a, 0, 2), _src(b, 1, 3)]},
                       {"sources": [_src(a, 2, 3), _src(b, 2, 3)], "parameters": {"t": 0.3}}]}),
        "slices: task_arithmetic, partial range": ("exact", {
            "merge_method": "task_arithmetic", "base_model": base, **common,
            "slices": [{"sources": [_src(base, 1, 3), _src(a, 1, 3, weight=0.6), _src(b, 1, 3, weight=0.3)]}]}),
    }


# ---------------------------------------------------------------------- tokenizer unions
WORDS = ["<pad>", "<s>", "</s>", *[f"w{i}" for i in range(157)]]  # 160 tokens: the families' vocab
ADDED = ["<|im_start|>", "<|im_end|>"]


def save_tokenizer(folder: Path, special: list[str] = ()) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if special:
        tok.add_special_tokens({"additional_special_tokens": list(special)})
    tok.save_pretrained(folder)


def build_vocab_family(arch: str, config, root: Path, seed: int = 7) -> dict[str, Path]:
    """A base with a 160-token tokenizer, a fine-tune of it that added 2 special tokens
    (162 embedding rows, the new rows random) and a plain fine-tune of it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    out = {"base": root / arch / "vocab_base", "chat": root / arch / "vocab_chat",
           "plain": root / arch / "vocab_plain"}
    base.save_pretrained(out["base"], safe_serialization=True)
    save_tokenizer(out["base"])
    state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    for name, rows in (("chat", len(WORDS) + 2), ("plain", len(WORDS))):
        g = torch.Generator().manual_seed(hash(name) % 1000)
        cfg = config.__class__.from_dict({**config.to_dict(), "vocab_size": rows})
        model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
        new = {}
        for key, w in model.state_dict().items():
            old = state[key].float()
            delta = torch.randn(old.shape, generator=g) * 0.05 * old.abs().mean().clamp(min=1e-3)
            value = old + delta
            if w.shape != old.shape:  # the added rows: random, of the embeddings' scale
                value = torch.cat([value, torch.randn(w.shape[0] - old.shape[0], *w.shape[1:],
                                                      generator=g) * old.std()])
            new[key] = value.to(torch.bfloat16)
        model.load_state_dict(new, strict=False)
        model.save_pretrained(out[name], safe_serialization=True)
        save_tokenizer(out[name], ADDED if name == "chat" else ())
    return out


def vocab_recipes(f: dict[str, Path]) -> dict[str, tuple[str, dict]]:
    base, chat, plain = (str(f[k]) for k in ("base", "chat", "plain"))
    common = {"dtype": "float32", "out_dtype": "bfloat16"}
    return {
        "tokenizer union (vocab 160 + 162), linear": ("exact", {
            "merge_method": "linear", **common, "tokenizer": {"source": "union"},
            "models": [{"model": base, "parameters": {"weight": 0.3}},
                       {"model": chat, "parameters": {"weight": 0.7}}]}),
        "tokenizer union, task_arithmetic, tokens, pad 64": ("exact", {
            "merge_method": "task_arithmetic", "base_model": base, **common,
            "tokenizer": {"source": "union", "pad_to_multiple_of": 64,
                          "tokens": {"<|im_end|>": {"source": {"kind": "zero"}, "force": True}}},
            "models": [{"model": chat, "parameters": {"weight": 0.7}},
                       {"model": plain, "parameters": {"weight": 0.4}}]}),
    }


# ---------------------------------------------------------------------- running and comparing
def run_mergekit(exe: str, recipe_path: Path, out: Path) -> tuple[float, str | None]:
    """Seconds, and mergekit's last error line when it failed (its tensors, when it wrote them
    before failing, are still compared)."""
    started = time.perf_counter()
    proc = subprocess.run([exe, str(recipe_path), str(out), "--no-cuda", "--random-seed", "0", "--quiet",
                           "--allow-crimes"], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    error = None
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        error = lines[-1].strip() if lines else f"exit {proc.returncode}"
        print(f"  mergekit failed on {recipe_path.name}: {error}", file=sys.stderr)
    return time.perf_counter() - started, error


def run_ours(recipe_path: Path, out: Path) -> float:
    from engine.merge.executor import run_merge
    from engine.recipe import load_recipe

    started = time.perf_counter()
    run_merge(load_recipe(recipe_path), out, device="cpu")
    return time.perf_counter() - started


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                out[name] = handle.get_tensor(name)
    return out


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """One bf16 unit in the last place at |x| (8 significant bits)."""
    mag = x.abs().clamp(min=2.0 ** -126)
    return torch.exp2(torch.floor(torch.log2(mag)) - 7)


def trim_thresholds(delta: torch.Tensor, density: float, gamma: float | None) -> torch.Tensor:
    """Entries whose |delta| equals a trim threshold (the k-th largest magnitude; for
    breadcrumbs also the outlier cut): where mergekit's tie-breaking may keep another entry."""
    mag = delta.abs().reshape(-1)
    n = mag.numel()
    if density >= 1:
        return torch.zeros_like(delta, dtype=torch.bool)
    sorted_mag = torch.sort(mag, descending=True).values
    keep = max(1, int(density * n))
    values = [sorted_mag[keep - 1]]
    if gamma is not None:
        n_top = int(gamma * n)
        n_bottom = n - keep - n_top
        if n_bottom < 0:
            n_top, n_bottom = n_top + n_bottom, 0
        values = [sorted_mag[n - n_bottom - 1]] + ([sorted_mag[n_top - 1]] if n_top > 0 else [])
        if n_top > 0:
            values.append(sorted_mag[n_top])
    tied = torch.zeros_like(mag, dtype=torch.bool)
    for v in values:
        tied |= mag == v
    return tied.view(delta.shape)


def compare(kind: str, ours: dict, theirs: dict, base: dict, recipe: dict | None = None) -> dict:
    names = sorted(set(ours) & set(theirs))
    only = sorted(set(ours) ^ set(theirs))
    total = beyond = differing = unexplained = 0
    max_diff = 0.0
    changed_ours = changed_theirs = 0
    norm_ours = norm_theirs = 0.0
    inputs = []
    if kind == "trim" and recipe is not None:
        inputs = [(load_tensors(Path(m["model"])), m.get("parameters", {})) for m in recipe["models"]]
    for name in names:
        o, t = ours[name].float(), theirs[name].float()
        diff = (o - t).abs()
        # 1 bf16 ulp of the larger value, plus fp32 rounding of the sum (exact cancellations)
        tol = bf16_ulp(torch.maximum(o.abs(), t.abs())) * 1.0001 + 2.0 ** -20 * float(o.abs().max())
        total += diff.numel()
        differing += int((diff > 0).sum())
        out_of_tol = diff > tol
        beyond += int(out_of_tol.sum())
        max_diff = max(max_diff, float(diff.max()) if diff.numel() else 0.0)
        if inputs and name in base:
            tied = torch.zeros_like(o, dtype=torch.bool)
            for tensors, params in inputs:
                delta = tensors[name].float() - base[name].float()
                tied |= trim_thresholds(delta, params.get("density", 1.0),
                                        params.get("gamma", 0.01) if "breadcrumbs" in recipe["merge_method"] else None)
            unexplained += int((out_of_tol & ~tied).sum())
        if name in base and base[name].shape == o.shape:
            b = base[name].float()
            changed_ours += int((o != b).sum())
            changed_theirs += int((t != b).sum())
            n_o, n_t = float((o - b).double().norm()), float((t - b).double().norm())
            if n_t > 0:  # entry-weighted mean of per-tensor norm ratios (big tensors: tight statistics)
                norm_ours += o.numel() * n_o / n_t
                norm_theirs += o.numel()
    result = {"tensors": len(names), "entries": total, "names_only_one_side": only,
              "max_abs_diff": max_diff, "frac_differing": differing / max(total, 1),
              "frac_beyond_1ulp": beyond / max(total, 1)}
    if kind == "random":
        result["changed_frac_ours"] = changed_ours / max(total, 1)
        result["changed_frac_mergekit"] = changed_theirs / max(total, 1)
        result["delta_norm_ratio"] = norm_ours / max(norm_theirs, 1e-30)
    if kind == "exact":
        result["ok"] = not only and beyond == 0
    elif kind == "trim":
        result["unexplained"] = unexplained
        result["ok"] = not only and unexplained == 0
    else:
        result["ok"] = (not only and abs(result["changed_frac_ours"] - result["changed_frac_mergekit"]) < 0.02
                        and abs(result["delta_norm_ratio"] - 1) < 0.05)
    return result


def loads(folder: Path) -> bool:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False)
        logits = model(torch.tensor([[1, 5, 7, 9]])).logits
        return bool(torch.isfinite(logits).all())
    except Exception as err:  # reported in the table
        print(f"  load failed for {folder}: {type(err).__name__}: {err}", file=sys.stderr)
        return False


# ---------------------------------------------------------------------- report
def table(rows: list[dict]) -> str:
    lines = ["| arch | recipe | compared as | max abs diff | entries differing | beyond 1 bf16 ulp | "
             "of those, not at a trim-threshold tie | survivors ours / mergekit | delta norm ours/mk | "
             "loads (ours, mk) | ok |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["cmp"]
        surv = (f"{c['changed_frac_ours']:.3f} / {c['changed_frac_mergekit']:.3f}"
                if "changed_frac_ours" in c else "")
        ratio = f"{c['delta_norm_ratio']:.3f}" if "delta_norm_ratio" in c else ""
        lines.append(f"| {r['arch']} | {r['recipe']} | {r['kind']} | {_num(c['max_abs_diff'], '.2e')} | "
                     f"{_num(c['frac_differing'], '.4f')} | {_num(c['frac_beyond_1ulp'], '.5f')} | "
                     f"{c.get('unexplained', '')} | "
                     f"{surv} | {ratio} | "
                     f"{'yes' if r['loads_ours'] else 'NO'}, "
                     f"{'yes' if r['loads_mk'] else _mk_failure(r)} | "
                     f"{'yes' if c['ok'] else 'NO'} |")
    return "\n".join(lines)


def _num(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _mk_failure(row: dict) -> str:
    if not row.get("mergekit_error"):
        return "NO"
    return "fails (a)" if row["cmp"].get("compared", True) else "fails (b)"


def render(mk_version: str, rows: list[dict]) -> str:
    """The README section's body from the raw rows (what ``--render`` writes)."""
    return (f"Same YAML recipe through `mergekit-yaml` (mergekit {mk_version}, its own venv, CPU) and "
            f"`python -m engine merge`; tiny random bf16 families (3 layers, hidden 64, vocab 160; "
            f"GPT-2 with Conv1D weights and tied embeddings; Qwen2 with q/k/v biases and tied "
            f"embeddings). Recipes use `dtype: float32, out_dtype: bfloat16` (mergekit computes in "
            f"`dtype`; we always compute in fp32). `exact`: every entry within 1 bf16 ulp; `trim`: "
            f"every entry beyond 1 ulp lies where some model's |delta| equals its trim threshold "
            f"(bf16 deltas tie often; mergekit breaks ties arbitrarily, we keep the lower index); `random`: "
            f"masks come from different generators, so compared are the fraction of entries that "
            f"differ from the base (survivors) and the norm of the merged task vector (per tensor, "
            f"ours over mergekit's, averaged weighted by entries), within 2 points and 5%. Every output, ours and mergekit's, is loaded with "
            f"`AutoModelForCausalLM` and run once.\n\n"
            f"`slices:` rows are frankenmerges (layer ranges of several models stacked; a method per "
            f"slice), every tensor compared. `tokenizer union` rows merge a base with a 160-token "
            f"tokenizer and a fine-tune that added 2 special tokens (162 embedding rows): the same "
            f"merged vocabulary, and every embedding and head row compared. (a): mergekit fails: it "
            f"sets the layer count but keeps Qwen2's `layer_types`, and transformers refuses that "
            f"config when mergekit saves it (after the tensors, which are compared); ours loads. "
            f"(b): mergekit fails before writing anything (nothing to compare; ours loads): for "
            f"Qwen2, transformers' Qwen2 tokenizer adds `<|endoftext|>` beyond the 160 embedding "
            f"rows, and mergekit's permutation then raises `KeyError` for that token (a token the "
            f"tokenizer has beyond the model's rows: the vocab 32000 vs 32001 case); ours maps it "
            f"to no model's row (a zero row, as mergekit does for a token no model has).\n\n"
            f"Reproduce: `python bench/mergekit_parity.py --mergekit VENV/bin/mergekit-yaml --readme` "
            f"(mergekit installed into a separate venv: `python -m venv VENV && VENV/bin/pip install "
            f"torch==2.13.0 mergekit`); only the slice and tokenizer rows, merged into the earlier "
            f"results: add `--only slices: --only 'tokenizer union' --update "
            f"bench/results/mergekit_parity.json`.\n\n" + table(rows))


def update_readme(section_body: str) -> None:
    write_readme_section(SECTION, section_body)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit", default=os.environ.get("MERGEKIT_YAML", "mergekit-yaml"),
                        help="mergekit-yaml executable (from a separate venv)")
    parser.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--arch", action="append", help="only these architectures (llama, gpt2, qwen2)")
    parser.add_argument("--only", action="append", help="only recipes whose name contains this")
    parser.add_argument("--readme", action="store_true", help="write the table into bench/README.md")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--update", default=None, metavar="JSON",
                        help="merge the rows run into this earlier --json file (same arch and recipe: "
                             "replaced) and write the table of all of them")
    parser.add_argument("--render", action="store_true",
                        help="only write the README section from bench/results/mergekit_parity.json "
                             "(measures nothing)")
    args = parser.parse_args(argv)
    if args.render:
        record = json.loads(RESULTS.read_text())
        update_readme(render(record["mergekit_version"], record["rows"]))
        return 0
    torch.set_num_threads(1)
    exe = shutil.which(args.mergekit) or args.mergekit
    if not Path(exe).exists():
        parser.error(f"mergekit-yaml not found ({args.mergekit}); see bench/README.md")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mk_parity_"))
    work.mkdir(parents=True, exist_ok=True)
    mk_version = subprocess.run([str(Path(exe).parent / "python"), "-c",
                                 "import importlib.metadata as m; print(m.version('mergekit'))"],
                                capture_output=True, text=True).stdout.strip() or "?"
    rows = []
    try:
        for arch, config in _configs().items():
            if args.arch and arch not in args.arch:
                continue
            folders = build_family(arch, config, work / "models")
            base = load_tensors(folders["base"])
            todo = [(name, kind, recipe, base) for name, (kind, recipe) in recipes(folders).items()]
            vocab_names = vocab_recipes({k: Path(k) for k in ("base", "chat", "plain")})
            if not args.only or any(o in name for o in args.only for name in vocab_names):
                vocab = build_vocab_family(arch, config, work / "models")
                vocab_base = load_tensors(vocab["base"])  # the vocabulary family's own base
                todo += [(name, kind, recipe, vocab_base)
                         for name, (kind, recipe) in vocab_recipes(vocab).items()]
            for name, kind, recipe, row_base in todo:
                if args.only and not any(o in name for o in args.only):
                    continue
                slug = "".join(ch if ch.isalnum() else "_" for ch in name)
                recipe_path = work / "recipes" / arch / f"{slug}.yml"
                recipe_path.parent.mkdir(parents=True, exist_ok=True)
                recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
                out_mk, out_ours = work / "out" / arch / slug / "mergekit", work / "out" / arch / slug / "ours"
                for o in (out_mk, out_ours):
                    shutil.rmtree(o, ignore_errors=True)
                    o.parent.mkdir(parents=True, exist_ok=True)
                t_mk, mk_error = run_mergekit(exe, recipe_path, out_mk)
                t_ours = run_ours(recipe_path, out_ours)
                if list(out_mk.glob("*.safetensors")):
                    cmp = compare(kind, load_tensors(out_ours), load_tensors(out_mk), row_base, recipe)
                else:  # mergekit wrote nothing to compare with: ours must load (checked below)
                    cmp = {"tensors": 0, "entries": 0, "names_only_one_side": [], "max_abs_diff": None,
                           "frac_differing": None, "frac_beyond_1ulp": None, "ok": True,
                           "compared": False}
                row = {"arch": arch, "recipe": name, "kind": kind, "cmp": cmp,
                       "loads_ours": loads(out_ours), "loads_mk": loads(out_mk) if mk_error is None else False,
                       "mergekit_error": mk_error,
                       "seconds_mergekit_process": round(t_mk, 2), "seconds_ours_in_process": round(t_ours, 3)}
                rows.append(row)
                print(f"{arch:6s} {name:32s} {kind:6s} max|d|={_num(cmp['max_abs_diff'], '.2e')} "
                      f"differ={_num(cmp['frac_differing'], '.4f')} >1ulp={_num(cmp['frac_beyond_1ulp'], '.5f')} "
                      f"{'' if 'delta_norm_ratio' not in cmp else 'surv %.3f/%.3f norm %.3f ' % (cmp['changed_frac_ours'], cmp['changed_frac_mergekit'], cmp['delta_norm_ratio'])}"
                      f"loads={row['loads_ours']},{row['loads_mk']} ok={cmp['ok']}", flush=True)
                if cmp["names_only_one_side"]:
                    print(f"   names on one side only: {cmp['names_only_one_side']}", flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    if args.update:
        earlier = json.loads(Path(args.update).read_text())["rows"] if Path(args.update).exists() else []
        fresh = {(r["arch"], r["recipe"]) for r in rows}
        order = {a: i for i, a in enumerate(_configs())}
        rows = sorted([r for r in earlier if (r["arch"], r["recipe"]) not in fresh] + rows,
                      key=lambda r: order.get(r["arch"], 99))  # stable: recipes keep their order
        Path(args.update).write_text(json.dumps({"mergekit_version": mk_version, "rows": rows}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"mergekit_version": mk_version, "rows": rows}, indent=2))
    body = render(mk_version, rows)
    print(table(rows))
    if args.readme:
        update_readme(body)
    return 0 if all(r["cmp"]["ok"] and r["loads_ours"] and (r["loads_mk"] or r.get("mergekit_error"))
                    for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
