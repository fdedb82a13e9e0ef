"""Quality vs ratio of every delta compressor on the demo zoo.

For every zoo fine-tune (its base: the model it was fine-tuned from), every method and every
target ratio: compress into a real artifact, rebuild in memory from the artifact, score the
fine-tune's own task (greedy decoding, exact match, held-out examples). Writes:

- a section of bench/README.md (between markers; other sections are kept),
- bench/results/compress_quality.json: a plotly figure (retained accuracy vs ratio),
- bench/results/compress_quality_rows.json: every measurement.

    python bench/compress_quality.py --zoo ZOO [--methods ...] [--ratios 4 8 16 32 64]

A method entry is a registry name, optionally with parameters as a YAML flow mapping, e.g.
``'impart{quant: true, preprune: 0.9}'`` (the whole string labels the row). ``extract-lora``
(with ``engine.lora.extract.ExtractOptions`` as parameters, the rank excepted) is the LoRA
adapter ``python -m engine extract-lora`` writes, at the largest rank whose folder fits the
ratio's byte budget; rebuilt as base + adapter by our adapter reader.

``--add-to ROWS.json`` measures only the given methods and renders them with the rows saved
there (rows of the same labels replaced), so a new method does not re-measure the table.

``--scopes all blocks`` measures every compressor row twice: as given, and with ``scope:
blocks, ratio_over: compressed`` appended (the papers' setting: only the transformer blocks'
matrices compressed, embeddings, head and norms kept as fp16 deltas, the target ratio over the
compressed set); a cell of such a row shows both the ratio over the compressed set and the
ratio on disk. A row spec can also carry these parameters itself, e.g.
``'delta_dct{scope: blocks, ratio_over: compressed}'``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench._common import write_marked_section  # noqa: E402

from engine.compress import compress, folder_bytes, rebuild_state_dict  # noqa: E402
from engine.evaluate import evaluate_state_dict  # noqa: E402
from engine.io import ModelFolder  # noqa: E402
from engine.zoo import default_zoo_dir, load_manifest  # noqa: E402

SECTION = "compress_quality"
RATIOS = (4, 8, 16, 32, 64)
# The papers' defaults, then the variants tuned for the zoo's tiny models (bench/README.md).
DEFAULT_METHODS = [
    "magnitude", "dare", "svd", "bitdelta", "delta_come", "impart", "delta_dct", "dbms",
    "delta_dct{split: 0.5}",
    "delta_dct{allocation: rd, quantizer: mse, zero_patches: zero, rescale: none}",
    "bitdelta{distill: false}",
    "delta_come{group_size: 32}",
    "delta_come{group_size: 32, quantizer: symmetric}",
    "impart{quant: true, preprune: 0.9, group_size: 32}",
    "dbms{inner: delta_come, inner_params: {group_size: 32}}",
    "delta_dct{allocation: rd, quantizer: mse, zero_patches: zero, rescale: projection}",
    "delta_dct{allocation: rd, quantizer: mse, zero_patches: zero, rescale: projection, patch_size: 32}",
    "bitdelta{objective: task_kl, steps: 100, lr: 0.001}",
    "extract-lora{dtype: float16}",
    "extract-lora{dtype: float16, embed_lora: true}",
]
SCALES = (0.5, 0.7, 0.85, 1.25, 1.5)  # base + s x delta: how much of its delta a fine-tune needs
NOISES = (0.5, 1.0)  # fine-tune + Gaussian noise of c x ||delta|| per matrix: dense-noise tolerance


def with_noise(ft_sd: dict, base_sd: dict, c: float, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in ft_sd.items():
        if t.ndim == 2:
            noise = torch.randn(t.shape, generator=gen)
            out[name] = t + c * float((t - base_sd[name]).norm()) * noise / noise.norm()
        else:
            out[name] = t
    return out

NOTES = """
### What each compressor stores, the papers' choices, and our adaptations to tiny models

Rows without braces use each paper's defaults; rows with braces are the variants we tuned for
the zoo (parameters as given); the tuned rows of delta_dct, impart, delta_come, dbms and
bitdelta ship as each method's `small-models` preset (`python -m engine compress ...
--preset small-models`, or the compression lab's "Parameters" choice; a test keeps presets and
rows the same). Every artifact is a real folder: `manifest.json`,
`delta.safetensors` (section offsets, the 1-D deltas in fp16, the packed sections) and the
fine-tune's config/tokenizer files unless byte-identical to the base's (then referenced by one
sha256 and copied from the base at rebuild: on these 0.1-0.4 M-parameter models the tokenizer
and config alone would be ~5 KB, more than the whole 64x budget of the small family).

- `magnitude`: top-k of |delta| (selection, not a sort); positions as a bit mask or Golomb-Rice
  coded gaps, whichever is smaller; values fp16.
- `dare`: a random subset of exactly k entries (Bernoulli in the paper), rescaled by n/k; the
  mask regenerates from a seed with our own splitmix64-based sampler (library-version proof),
  so only values are stored.
- `svd`: rank-r truncation, `U_r S_r` and `V_r` in fp16.
- `bitdelta`: one sign plane and one fp16 scale (mean |d|) per matrix (16x before overheads),
  then the paper's stage 2, scale distillation, as the authors run it (`FasterDecoding/BitDelta`,
  `bitdelta/train.py`, `scripts/train_example.bash`): the scales alone (the authors' script also
  leaves embeddings, norms and head trainable; the paper distils the scales) are trained so the
  rebuilt model's logits match the fine-tune's (mean squared error over every position), 200
  steps of 4 rows of 128 tokens, AdamW at lr 1e-4 cosine-annealed to 0. Their text is C4; ours
  (an adaptation): the user's `--calibration` file (dev split), else the zoo bases' own
  pretraining text (generic lines and the upper-case-tag skill records of every task, training
  split; never the fine-tune's task prompts), packed into full rows; a fine-tune in no zoo and
  without a file is distilled on that text with a warning in the manifest and the result.
  `{distill: false}`: stage 1 alone. `{objective: task_kl, steps: 100, lr: 0.001}` (ours, the
  `small-models` preset): KL to the fine-tune's next-token distributions at the answer
  positions of 32 training prompts of its zoo task, Adam at a constant lr. Other ratios than
  16x are our extension: residual sign planes, given greedily (error reduction per byte, from
  a first streaming pass) to the matrices that gain most; at 16x on these models the fixed
  costs push a few matrices to zero planes.
- `delta_come`: the released schedule (8 bits for 2 singular-vector pairs, 3 bits for 32, 2 bits
  for as many as the budget pays, the rest dropped), groups of 128 values, asymmetric as in the
  authors' GPTQ runs (no `--sym`): per group the range widened to hold 0, an fp16 scale and an
  integer zero-point (packed at the group's bit width). Round-to-nearest, not GPTQ: GPTQ itself
  (C4 calibration activations, error feedback, act-order; `U`'s groups running across singular
  vectors, one scale per row) is not implemented, so each singular vector is grouped along its
  length and `sigma_i` is folded into `u_i`. `{quantizer: symmetric}` (our earlier default): one
  fp16 step per group, clipping searched for the smallest squared error. Tiny adaptation:
  groups of 32 (the vectors are only 128-320 long, one group of 128 per vector is too coarse).
- `impart`: Algorithm 1 of the paper exactly (singular values to the power C, pre-prune beta,
  per-component drop ratio `gamma (1 - s_i/s_max)`, boundary shift), `C = 0.5`, `beta = 0.8`
  (the authors' released config for CR 32), lowered to `2 alpha - 1` at low sparsity; masks
  seeded as for dare, survivors rescaled by the inverse keep ratio, fp16 values. Tiny
  adaptation: ImPart-Qt (the authors' quantised variant: 8 bits for the first 2 components, 3
  for the next 32, 2 after, as in the authors' configs and Delta-CoMe; kept values in groups of
  32 with one fp16 step, our symmetric round-to-nearest, not the authors' GPTQ) with
  `beta = 0.9`; at the zoo's ratios
  beta then reaches alpha, i.e. dense, quantised low-rank components: the random
  drop-and-rescale of singular vectors costs more accuracy here than the rank it buys.
- `delta_dct`: the paper's method by default: patches of 16x16 (the matrices are 128-320 wide),
  importance = patch L2 norm, fixed widths by norm rank (2/1/0 bits for the top quarter, the
  middle half and the bottom quarter at the 1-bit budget; `2c/c/0` with `c = round(mean bits)`
  above 1.5 bits, our extension), orthonormal 2-D DCT-II, per-patch min-max quantisation (each
  coded patch stores its fp16 min and max), a 0-bit patch rebuilt as its mean (one fp16), and
  the rebuilt matrix scaled to the delta's mean |d| (one fp16 per matrix). Not verified in the
  paper's text (its method section was not available to us and no authors' code was found):
  the ladder's shares, the widths away from the 1-bit budget, the patch size per model.
  `{split: 0.5}`: half the patches at 2 bits and half at 0 (no 1-bit patches). Our
  adaptations, each a named option: `allocation: rd` (every patch picks a width in
  {0,1,2,3,4,5,6,8} minimising `error + lambda * bits`, JPEG-style rate-distortion, lambda
  solved to fit the budget), `quantizer: mse` (symmetric, one fp16 step per patch, clipping
  searched), `zero_patches: zero`, `rescale: none` or `rescale: projection` (one fp16 per
  matrix: the rebuilt delta is scaled by `||d||^2 / <d, d_hat>` so its component along the true
  delta is full length again; nearest-level quantisation and zeroed patches shrink it to about
  half at 16x); the rows naming all four are the earlier defaults. `patch_size: 32` spends
  fewer bytes on per-patch values and bit widths.
- `dbms`: "DBMS-style scalar calibration", ours, not the paper's method. DBMS shifts the base
  toward a compressed base vector *before* the delta is compressed and learns a shift magnitude
  and a delta scale; its method section (how the base vector is made and compressed, the
  fusion, the objective) was not available to us (the abstract and first page only; no public
  code), so the rows do not claim it. What they measure: the inner compressor (`delta_dct` by
  default) compresses the unchanged delta with the whole budget, and every compressed matrix
  is rebuilt as `(1 + alpha) W_base + lambda d_hat`, alpha and lambda learned with Adam (60
  steps, lr 0.02) to match the fine-tune's next-token distributions on the answer positions of
  32 training prompts of its task (a fine-tune in no zoo: every task's, with a warning). The
  label stays `dbms`, the registry name.
- `{scope: blocks, ratio_over: compressed}` rows (`--scopes all blocks`): the papers' setting.
  Only the transformer blocks' matrices are compressed; embeddings, LM head, norms and biases
  are kept as fp16 deltas (2 bytes an entry) and still counted on disk. They are 4-7% of the
  full zoo's entries, which caps the on-disk ratio at 14-25x, so these rows aim the target at
  the ratio over the compressed set (2 bytes x the compressed entries / their sections' bytes,
  the papers' convention) and show the on-disk ratio beside it (`set / disk` in the cells).
"""

LORA_NOTE = """- `extract-lora`: not a delta compressor but the PEFT adapter `python -m engine extract-lora`
  writes (truncated SVD of each linear layer's task vector, `B = U_r sqrt(S_r)`,
  `A = sqrt(S_r) V_r^T`, here in fp16), at the largest rank `r` (the same for every module)
  whose folder fits the budget: `adapter_model.safetensors`, `adapter_config.json`, the model
  card and the manifest all count, as every file of an artifact does. Rebuilt as base +
  adapter by our adapter reader. What LoRA cannot carry stays the base's: the norms' deltas
  always, and the embeddings' and head's unless `embed_lora: true` (mergekit's default is off).
  The rank of each cell and the size of each file are in the rows file (`rank`, `files`).
"""
NOTES += LORA_NOTE


PAPER_SCOPE = "scope: blocks, ratio_over: compressed"


def with_scope(label: str) -> str:
    """The row ``label`` in the papers' scope (see ``--scopes``)."""
    return f"{label[:-1]}, {PAPER_SCOPE}}}" if label.endswith("}") else f"{label}{{{PAPER_SCOPE}}}"


def scoped_methods(methods: list[str], scopes: list[str]) -> list[str]:
    out = []
    for label in methods:
        if "all" in scopes:
            out.append(label)
        if "blocks" in scopes and parse_method(label)[0] != LORA and "scope" not in parse_method(label)[1]:
            out.append(with_scope(label))
    return list(dict.fromkeys(out))


def set_ratio_shown(label: str) -> bool:
    """Does the row's cell show the ratio over the compressed set too?"""
    params = parse_method(label)[1]
    return params.get("scope", "all") != "all" or params.get("ratio_over", "artifact") != "artifact"


def parse_method(entry: str) -> tuple[str, dict]:
    import yaml

    name, brace, rest = entry.partition("{")
    params = yaml.safe_load(brace + rest) if brace else {}
    if not isinstance(params, dict):
        raise SystemExit(f"method entry {entry!r}: parameters must be a mapping")
    return name.strip(), params


def fine_tunes(manifest: dict, only: list[str] | None) -> list[dict]:
    by_path = {m["path"]: m for m in manifest["models"]}
    out = []
    for entry in manifest["models"]:
        if entry["role"] != "finetune" or not entry.get("task") or not entry.get("parent"):
            continue
        if only and entry["path"] not in only:
            continue
        out.append({"path": entry["path"], "task": entry["task"], "abs": entry["abs_path"],
                    "base": by_path[entry["parent"]]["abs_path"], "base_path": entry["parent"]})
    return out


def evaluate(state: dict, config: dict, task: str, n: int) -> float:
    return evaluate_state_dict(state, config, tasks=[task], n_per_task=n, n_generic=0)["tasks"][task]["accuracy"]


def _median(values: list[float]) -> float | None:
    values = sorted(values)
    return values[len(values) // 2] if values else None


def delta_fidelity(state: dict, ft_sd: dict, base_sd: dict) -> dict:
    """Medians over the matrices of: the rebuilt delta's component along the true delta
    (<d, d_hat> / ||d||^2; 1 = full length, what quantisation and dropping shrink) and the
    relative error ||d_hat - d|| / ||d||."""
    along, error = [], []
    for name, base_t in base_sd.items():
        if base_t.ndim != 2:
            continue
        d = (ft_sd[name] - base_t).double()
        d_hat = (state[name].double() - base_t.double())
        energy = float((d * d).sum())
        if energy > 0:
            along.append(float((d * d_hat).sum()) / energy)
            error.append(float((d_hat - d).norm()) / energy ** 0.5)
    return {"along": _median(along), "rel_error": _median(error)}


LORA = "extract-lora"


def _extract(model: dict, out: Path, params: dict, rank: int) -> int:
    """Extract the adapter at ``rank`` into ``out`` (replaced); its bytes on disk."""
    from engine.lora.extract import ExtractOptions, extract_lora

    shutil.rmtree(out, ignore_errors=True)
    extract_lora(model["base"], model["abs"], out, ExtractOptions(**params, rank=rank))
    return folder_bytes(out)


def lora_adapter(model: dict, out: Path, params: dict, entries: int, ratio: float) -> tuple[int, int]:
    """``(rank, bytes)``: the adapter at the largest rank whose folder (weights, adapter config,
    card, manifest: every file, as for an artifact) fits ``2 * entries / ratio`` bytes, left in
    ``out``. Bytes grow linearly with the rank (each module stores ``r * (in + out)`` values),
    so two extractions give the estimate, then it is checked and stepped to the exact fit."""
    budget = 2.0 * entries / ratio
    one = _extract(model, out, params, 1)
    if one > budget:
        raise ValueError(f"out of reach: rank 1 takes {one} bytes, the budget is {int(budget)}")
    per_rank = max(1, _extract(model, out, params, 2) - one)
    rank = max(1, 1 + int((budget - one) // per_rank))
    size = _extract(model, out, params, rank)
    while size > budget and rank > 1:
        rank -= 1
        size = _extract(model, out, params, rank)
    while True:  # a rank beyond every module's own (min(in, out)) stores no more: stop there
        bigger = _extract(model, out, params, rank + 1)
        if bigger > budget or bigger == size:
            break
        rank, size = rank + 1, bigger
    return rank, _extract(model, out, params, rank)


def lora_state(base_path: str, adapter: Path) -> dict:
    """base + adapter, tensor by tensor, through our reader (``AdapterFinetune``)."""
    from engine.lora.finetune import AdapterFinetune

    with ModelFolder(base_path) as base, AdapterFinetune(base, adapter) as tuned:
        return {name: tensor.float() if tensor.is_floating_point() else tensor
                for name, tensor in tuned.iter_tensors()}


def measure_lora(model: dict, params: dict, ratio: float, work: Path, entries: int) -> dict:
    """The adapter fitting ``ratio``, rebuilt in memory: state, rank, bytes, achieved ratio."""
    out = work / f"{model['path'].replace('/', '_')}-lora"
    started = time.perf_counter()
    rank, size = lora_adapter(model, out, params, entries, ratio)
    seconds = time.perf_counter() - started
    state = lora_state(model["base"], out)
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
    shutil.rmtree(out, ignore_errors=True)
    return {"state": state, "rank": rank, "bytes": size, "ratio": 2.0 * entries / size,
            "seconds": seconds, "files": files}


def run(args) -> list[dict]:
    manifest = load_manifest(args.zoo)
    models = fine_tunes(manifest, args.fine_tunes)
    work = Path(tempfile.mkdtemp(prefix="compress-bench-", dir=args.workdir))
    rows = []
    try:
        for model in models:
            with ModelFolder(model["abs"]) as ft, ModelFolder(model["base"]) as base:
                config = ft.config
                ft_sd, base_sd = dict(ft.iter_tensors()), dict(base.iter_tensors())
                ft_acc = evaluate(ft_sd, config, model["task"], args.n)
                base_acc = evaluate(base_sd, config, model["task"], args.n)
                entries = sum(t.numel() for t in base_sd.values())
                rel = sorted(float((ft_sd[k] - base_sd[k]).norm() / base_sd[k].norm())
                             for k in base_sd if base_sd[k].ndim == 2)
                # of the fine-tune itself, stored with each of its rows (rows added to a saved
                # table need none: the saved rows carry it)
                profile = {} if args.add_to else {
                    "delta_norm_median": rel[len(rel) // 2],
                    "scale_curve": {
                        str(scale): evaluate({k: base_sd[k] + scale * (ft_sd[k] - base_sd[k])
                                              for k in base_sd}, config, model["task"], args.n)
                        for scale in SCALES},
                    "noise_curve": {
                        str(c): evaluate(with_noise(ft_sd, base_sd, c), config, model["task"], args.n)
                        for c in NOISES}}
            print(f"{model['path']}: fine-tune {ft_acc:.3f}, base {base_acc:.3f} on {model['task']}",
                  flush=True)
            saved = next((r for r in args.saved_rows if r["model"] == model["path"] and "error" not in r), None)
            if saved is not None and (saved["finetune_accuracy"], saved["base_accuracy"]) != (ft_acc, base_acc):
                raise SystemExit(f"{model['path']}: fine-tune/base accuracy {ft_acc}/{base_acc} differ from "
                                 f"the saved rows' {saved['finetune_accuracy']}/{saved['base_accuracy']}: "
                                 "not the zoo the table was measured on")
            for label in args.methods:
                method, params = parse_method(label)
                params.update(args.params.get(label, {}))
                for ratio in args.ratios:
                    if method == LORA:
                        try:
                            lora = measure_lora(model, params, ratio, work, entries)
                        except Exception as err:  # report, keep going
                            rows.append({"model": model["path"], "task": model["task"], "method": label,
                                         "target_ratio": ratio, "error": f"{type(err).__name__}: {err}"})
                            print(f"  {label} x{ratio}: failed: {err}", flush=True)
                            continue
                        acc = evaluate(lora["state"], config, model["task"], args.n)
                        fidelity = delta_fidelity(lora["state"], ft_sd, base_sd)
                        rows.append({
                            "model": model["path"], "task": model["task"], "method": label,
                            "target_ratio": ratio, "ratio": round(lora["ratio"], 3), "bytes": lora["bytes"],
                            "rank": lora["rank"], "files": lora["files"], "accuracy": acc, "finetune_accuracy": ft_acc,
                            "base_accuracy": base_acc, "retained": acc / ft_acc if ft_acc > 0 else None,
                            "compress_seconds": round(lora["seconds"], 2), "warnings": [],
                            "calibration": {}, **fidelity, **profile})
                        print(f"  {label:>10} x{ratio:<3} rank {lora['rank']} ratio {lora['ratio']:6.2f} "
                              f"acc {acc:.3f} along {fidelity['along']:.2f}", flush=True)
                        continue
                    art = work / f"{model['path'].replace('/', '_')}-{len(rows)}"
                    started = time.perf_counter()
                    try:
                        result = compress(model["base"], model["abs"], art, method, ratio=ratio,
                                          params=params, device=args.device)
                    except Exception as err:  # report, keep going
                        rows.append({"model": model["path"], "task": model["task"], "method": label,
                                     "target_ratio": ratio, "error": f"{type(err).__name__}: {err}"})
                        print(f"  {label} x{ratio}: failed: {err}", flush=True)
                        continue
                    seconds = time.perf_counter() - started
                    state = rebuild_state_dict(art, model["base"], device=args.device)
                    acc = evaluate(state, config, model["task"], args.n)
                    fidelity = delta_fidelity(state, ft_sd, base_sd)
                    rows.append({
                        "model": model["path"], "task": model["task"], "method": label,
                        "target_ratio": ratio, "ratio": round(result.ratio, 3), "bytes": result.bytes,
                        "accuracy": acc, "finetune_accuracy": ft_acc, "base_accuracy": base_acc,
                        "retained": acc / ft_acc if ft_acc > 0 else None,
                        "ratio_compressed": (None if result.ratio_compressed is None
                                             else round(result.ratio_compressed, 3)),
                        "compress_seconds": round(seconds, 2), "warnings": result.warnings,
                        "calibration": result.calibration, **fidelity, **profile})
                    print(f"  {label:>10} x{ratio:<3} ratio {result.ratio:6.2f} acc {acc:.3f} "
                          f"along {fidelity['along']:.2f} ({seconds:.1f}s)", flush=True)
                    shutil.rmtree(art, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(rows: list[dict], methods: list[str], ratios: list[int]) -> dict:
    table = {}
    for method in methods:
        for ratio in ratios:
            cell = [r for r in rows if r["method"] == method and r["target_ratio"] == ratio and "error" not in r]
            table[method, ratio] = {
                "retained": _mean([r["retained"] for r in cell]),
                "min_retained": min((r["retained"] for r in cell if r["retained"] is not None), default=None),
                "accuracy": _mean([r["accuracy"] for r in cell]),
                "ratio": _mean([r["ratio"] for r in cell]),
                "ratio_compressed": _mean([r.get("ratio_compressed") for r in cell]),
                "n": len(cell),
            }
    return table


def figure(rows, methods, ratios, table) -> dict:
    import plotly.graph_objects as go

    fig = go.Figure()
    for method in methods:
        xs = [r for r in ratios if table[method, r]["retained"] is not None]
        ys = [100 * table[method, r]["retained"] for r in xs]
        text = []
        for r in xs:
            per = [f"{row['model']}: {row['accuracy']:.2f}/{row['finetune_accuracy']:.2f}" for row in rows
                   if row["method"] == method and row["target_ratio"] == r and "error" not in row]
            text.append("<br>".join(per))
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=method, text=text,
                                 hovertemplate="%{x}x: %{y:.1f}% retained<br>%{text}<extra>" + method + "</extra>"))
    fig.add_hline(y=95, line_dash="dot", annotation_text="95% target")
    fig.update_layout(title="Own-task accuracy kept after compression (mean over zoo fine-tunes)",
                      xaxis={"title": "compression ratio (bytes on disk)", "type": "log",
                             "tickvals": list(ratios)},
                      yaxis={"title": "% of the fine-tune's accuracy", "range": [0, 105]},
                      template="plotly_white")
    return json.loads(fig.to_json())


def markdown(rows, methods, ratios, table, args, seconds) -> str:
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.0f}%"

    models = sorted({r["model"] for r in rows})
    lines = [
        "## Compression quality vs ratio" + (f" ({args.label})" if args.label else ""),
        "",
        "Own-task exact-match accuracy of each zoo fine-tune rebuilt from its compressed artifact, "
        "as a share of the uncompressed fine-tune's accuracy: mean over the fine-tunes "
        f"({', '.join(models)}), and in brackets the worst fine-tune. The ratio is measured on "
        "disk: 2 bytes x delta entries / bytes of the artifact folder (manifest and every file "
        "included); the achieved mean ratio is under each target. Rows with `scope: blocks` "
        "(the papers' setting, see the notes) show `set / disk`: the ratio over the compressed "
        "set they aim at, then the ratio on disk.",
        "",
        "| method | " + " | ".join(f"{r}x" for r in ratios) + " |",
        "|---|" + "---|" * len(ratios),
    ]
    for method in methods:
        cells = []
        for ratio in ratios:
            c = table[method, ratio]
            shown = ("" if c["ratio"] is None  # every run of the cell failed (out of reach)
                     else f"{c['ratio_compressed']:.1f}x / {c['ratio']:.1f}x"
                     if set_ratio_shown(method) and c["ratio_compressed"] is not None
                     else f"{c['ratio']:.1f}x")
            cells.append("n/a" if c["retained"] is None else
                         f"{pct(c['retained'])} ({pct(c['min_retained'])}) <br>{shown}")
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    lines += ["", "Per fine-tune at 16x (accuracy after / before; base):", "",
              "| fine-tune | task | fine-tune | base | " + " | ".join(f"`{m}`" for m in methods) + " |",
              "|---|---|---|---|" + "---|" * len(methods)]
    for model in models:
        sample = next(r for r in rows if r["model"] == model and "error" not in r)
        cells = []
        for method in methods:
            row = next((r for r in rows if r["model"] == model and r["method"] == method
                        and r["target_ratio"] == 16 and "error" not in r), None)
            cells.append("n/a" if row is None else f"{row['accuracy']:.2f}")
        lines.append(f"| {model} | {sample['task']} | {sample['finetune_accuracy']:.2f} | "
                     f"{sample['base_accuracy']:.2f} | " + " | ".join(cells) + " |")
    lines += ["", findings(rows, table, methods, ratios)]
    lines += [""] + fidelity_table(rows, methods)
    scales = scale_table(rows)
    if scales:
        lines += [""] + scales
    errors = [r for r in rows if "error" in r]
    if errors:
        lines += ["", "Failures: " + "; ".join(f"{r['model']} {r['method']} x{r['target_ratio']}: {r['error']}"
                                                for r in errors)]
    stem = section_stem(args.label)
    command = "python bench/compress_quality.py --zoo ZOO"
    if args.label:  # a second measurement: the method notes are in the main section
        command += f" --label '{args.label}' --methods ... --ratios {' '.join(map(str, ratios))}"
        if any(parse_method(m)[0] == LORA for m in methods):
            lines += ["", LORA_NOTE.strip()]
    else:
        lines += ["", NOTES.strip()]
    lines += ["", f"Measured with `{command}` ({len(rows)} runs, "
              f"{seconds / 60:.1f} min, {args.n} held-out examples per task, 1 CPU thread, "
              f"torch {torch.__version__}). Figure: `bench/results/{stem}.json` (plotly)."]
    return "\n".join(lines)


def per_model(rows: list[dict], key: str) -> dict:
    """``{fine-tune: value}`` of a per-fine-tune field that every row of it carries."""
    return {r["model"]: r[key] for r in rows if r.get(key) is not None}


def section_stem(label: str | None) -> str:
    """README section and results file name of a run (a labelled run has its own)."""
    return SECTION if not label else f"{SECTION}_{slug(label)}"


def _cell(table, method, ratio):
    c = table.get((method, ratio))
    return None if c is None or c["retained"] is None else c["retained"]


def _meeting(rows, method, ratio, bar=0.95) -> tuple[list[str], int]:
    cell = [r for r in rows if r["method"] == method and r["target_ratio"] == ratio
            and r.get("retained") is not None]
    return [r["model"] for r in cell if r["retained"] >= bar], len(cell)


def fidelity_table(rows, methods) -> list[str]:
    """At 16x: median (over matrices, then mean over fine-tunes) of the component kept along
    the true delta and of the relative error."""
    lines = ["At 16x, how much of each delta the rebuilt one keeps: `along` = <d, d_hat> / ||d||^2 "
             "(1 = full length; quantising to the nearest level and dropping entries shrink it), "
             "`error` = ||d_hat - d|| / ||d||; medians over the matrices, mean over the fine-tunes.",
             "", "| method | along | error | kept accuracy |", "|---|---|---|---|"]
    for method in methods:
        cell = [r for r in rows if r["method"] == method and r["target_ratio"] == 16
                and r.get("along") is not None]
        if not cell:
            continue
        along = sum(r["along"] for r in cell) / len(cell)
        error = sum(r["rel_error"] for r in cell) / len(cell)
        kept = _mean([r["retained"] for r in cell])
        lines.append(f"| `{method}` | {along:.2f} | {error:.2f} | "
                     f"{'n/a' if kept is None else f'{100 * kept:.0f}%'} |")
    return lines


def scale_table(rows: list[dict]) -> list[str]:
    scale_curves, noise_curves = per_model(rows, "scale_curve"), per_model(rows, "noise_curve")
    if not scale_curves:
        return []
    scales = list(next(iter(scale_curves.values())))
    noises = list(next(iter(noise_curves.values()), {}))
    lines = ["How much of its delta each fine-tune needs, and how much dense noise it tolerates: "
             "own-task accuracy of `base + s x delta`, and of the fine-tune plus Gaussian noise of "
             "norm `c x ||delta||` in every matrix (no compression).", "",
             "| fine-tune | " + " | ".join(f"s = {s}" for s in scales) + " | s = 1 | "
             + "".join(f"noise c = {c} | " for c in noises),
             "|---|" + "---|" * (len(scales) + 1 + len(noises))]
    for model, curve in sorted(scale_curves.items()):
        full = per_model(rows, "finetune_accuracy").get(model)
        noise = noise_curves.get(model, {})
        lines.append(f"| {model} | " + " | ".join(f"{curve[s]:.2f}" for s in scales)
                     + f" | {'n/a' if full is None else f'{full:.2f}'} | "
                     + "".join(f"{noise[c]:.2f} | " if c in noise else "n/a | " for c in noises))
    return lines


def findings(rows, table, methods, ratios) -> str:
    scale_curves, noise_curves = per_model(rows, "scale_curve"), per_model(rows, "noise_curve")
    out = ["**Findings.**"]
    if 16 in ratios:
        for family in ("delta_dct", "impart"):
            for method in [m for m in methods if m == family or m.startswith(family + "{")]:
                v = _cell(table, method, 16)
                good, n = _meeting(rows, method, 16)
                out.append(f"At 16x `{method}` keeps {'n/a' if v is None else f'{100 * v:.0f}%'} of the "
                           f"own-task accuracy on average; {len(good)} of {n} fine-tunes keep >= 95%"
                           + (f" ({', '.join(good)})" if good else "") + ".")
        best = max((m for m in methods if _cell(table, m, 16) is not None),
                   key=lambda m: _cell(table, m, 16), default=None)
        if best:
            out.append(f"The best at 16x is `{best}` ({100 * _cell(table, best, 16):.0f}%).")
    if "impart" in methods and "dare" in methods:
        known = [r for r in ratios if _cell(table, "impart", r) is not None
                 and _cell(table, "dare", r) is not None]
        gap = {r: _cell(table, "impart", r) - _cell(table, "dare", r) for r in known}
        wins = [f"{r}x ({100 * _cell(table, 'impart', r):.0f}% vs {100 * _cell(table, 'dare', r):.0f}%)"
                for r in known if gap[r] >= 0.01]
        ties = [f"{r}x" for r in known if abs(gap[r]) < 0.01]
        losses = [f"{r}x" for r in known if gap[r] <= -0.01]
        out.append(f"`impart` beats `dare` at {', '.join(wins) or 'no ratio'}"
                   + (f"; they tie (within a point) at {', '.join(ties)}" if ties else "")
                   + (f"; `dare` is better at {', '.join(losses)}" if losses else "") + ".")
    if scale_curves:
        def mean_at(scale):
            return _mean([c.get(scale) for c in scale_curves.values()])

        def along(method):
            vals = [r["along"] for r in rows if r["method"] == method and r["target_ratio"] == 16
                    and r.get("along") is not None]
            return sum(vals) / len(vals) if vals else None

        parts = [f"`{m}` {along(m):.2f}" for m in ("delta_dct", "impart", "bitdelta", "dare", "svd")
                 if m in methods and along(m) is not None]
        norms = sorted(per_model(rows, "delta_norm_median").values())
        out.append(
            "What decides it on the zoo: the fine-tunes' deltas are moderate (median matrix "
            f"||delta|| / ||W_base|| {norms[0]:.2f} to {norms[-1]:.2f}; LLM fine-tunes: about 0.01)"
            + (f" and tolerate dense noise (Gaussian noise of norm ||delta|| in every matrix keeps "
               f"{100 * _mean([c.get('1.0') for c in noise_curves.values()]):.0f}% on average)"
               if noise_curves else "")
            + ", but each needs most of its delta's length: `base + s x delta` keeps on average "
            f"{100 * mean_at('0.5'):.0f}% of the own-task accuracy at s = 0.5, "
            f"{100 * mean_at('0.7'):.0f}% at 0.7 and {100 * mean_at('0.85'):.0f}% at 0.85 (table below). "
            "Compressors that shrink the delta lose the task even when their error is moderate"
            + ("; the component kept along the delta at 16x is " + ", ".join(parts) if parts else "")
            + ". "
            "Rows that restore the length do far better at the same bytes: unbiased rescaling "
            "(`delta_dct{..., rescale: projection}`, one fp16 per matrix), learned scales "
            "(BitDelta's distillation, the DBMS-style scalars) or dense low-rank codes that "
            "keep the top singular directions nearly exact (Delta-CoMe, ImPart-Qt). LLM "
            "fine-tunes sit further inside their basin (and the papers' methods carry such "
            "corrections of their own: Delta-DCT's mean-|d| rescale, BitDelta's scale "
            "distillation), which may be why the papers need fewer of ours.")
    for method in [m for m in methods if parse_method(m)[0] == LORA]:
        cell = [r for r in rows if r["method"] == method and r["target_ratio"] == 16 and "rank" in r]
        if 16 in ratios and cell and _cell(table, method, 16) is not None:
            ranks = sorted(r["rank"] for r in cell)
            fixed = sorted(r["bytes"] - r["files"]["adapter_model.safetensors"] for r in cell)
            out.append(f"`{method}` keeps {100 * _cell(table, method, 16):.0f}% at 16x (rank "
                       f"{ranks[0]}-{ranks[-1]}; its config, card and manifest take "
                       f"{fixed[0] / 1024:.1f}-{fixed[-1] / 1024:.1f} KB of each budget).")
    if 32 in ratios or 64 in ratios:
        high = [r for r in (32, 64) if r in ratios]
        tops = []
        for r in high:
            top = max((m for m in methods if _cell(table, m, r) is not None),
                      key=lambda m: _cell(table, m, r), default=None)
            if top:
                tops.append(f"at {r}x the best is `{top}` ({100 * _cell(table, top, r):.0f}%)")
        if tops:
            out.append("Beyond 16x: " + "; ".join(tops) + ".")
    return " ".join(out)


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")


def parse_params(items: list[str]) -> dict:
    import yaml

    out: dict = {}
    for item in items:
        method, _, kv = item.partition(":")
        key, _, value = kv.partition("=")
        out.setdefault(method, {})[key] = yaml.safe_load(value)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=None, help="zoo folder (default: the app's zoo)")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--ratios", nargs="+", type=int, default=list(RATIOS))
    parser.add_argument("--scopes", nargs="+", choices=("all", "blocks"), default=["all"],
                        help="all: the rows as given; blocks: each compressor row also in the "
                             "papers' scope (blocks only, target over the compressed set)")
    parser.add_argument("--fine-tunes", nargs="+", default=None, help="zoo paths (default: all)")
    parser.add_argument("--n", type=int, default=128, help="held-out examples per task")
    parser.add_argument("--param", action="append", default=[], metavar="METHOD:KEY=VALUE")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--readme", type=Path, default=REPO / "bench" / "README.md")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--label", default=None,
                        help="a second measurement (e.g. 'zoo seed 1'): its own README section and "
                             "results files, the main ones untouched")
    parser.add_argument("--add-to", type=Path, default=None,
                        help="measure only --methods and render them with the rows saved in this "
                             "compress_quality_rows.json (rows of the same labels replaced)")
    parser.add_argument("--from-rows", type=Path, default=None,
                        help="re-render the table and figure from a saved compress_quality_rows.json")
    args = parser.parse_args(argv)
    args.zoo = args.zoo or default_zoo_dir()
    args.methods = scoped_methods(args.methods, args.scopes)
    args.params = parse_params(args.param)
    args.saved_rows = json.loads(args.add_to.read_text())["rows"] if args.add_to else []
    torch.set_num_threads(1)
    started = time.perf_counter()
    if args.from_rows:
        saved = json.loads(args.from_rows.read_text())
        rows, seconds = saved["rows"], saved["seconds"]
        args.n = saved.get("n", args.n)
        args.methods = list(dict.fromkeys(r["method"] for r in rows))
        args.ratios = sorted({r["target_ratio"] for r in rows})
    elif args.add_to:
        saved = json.loads(args.add_to.read_text())
        args.n = saved.get("n", args.n)  # the saved rows' sample, or the numbers do not compare
        new_rows = run(args)
        new_labels = set(args.methods)
        rows = [r for r in saved["rows"] if r["method"] not in new_labels] + new_rows
        seconds = saved["seconds"] + time.perf_counter() - started
        args.methods = list(dict.fromkeys(r["method"] for r in rows))
        args.ratios = sorted({r["target_ratio"] for r in rows})
    else:
        rows = run(args)
        seconds = time.perf_counter() - started
    stem = section_stem(args.label)
    if not args.no_write:  # the raw rows first: a rendering error must not lose an hour's runs
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / f"{stem}_rows.json").write_text(
            json.dumps({"rows": rows, "seconds": seconds, "n": args.n}, separators=(",", ":")))
    table = summarize(rows, args.methods, args.ratios)
    text = markdown(rows, args.methods, args.ratios, table, args, seconds)
    print(text)
    if not args.no_write:
        (args.results / f"{stem}.json").write_text(
            json.dumps(figure(rows, args.methods, args.ratios, table)))
        write_marked_section(stem, text, args.readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
