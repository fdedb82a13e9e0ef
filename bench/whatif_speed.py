"""What-if latency: merge the zoo's small family in memory and score it, per method.

Opens one ``WhatIfSession`` on the zoo's small base and every small fine-tune (what the app's
merge lab does), then times ``session.evaluate(method, ...)`` for every registered method:
the merge (same per-tensor code as ``python -m engine merge``) plus the evaluation on every
zoo task. fisher/regmean calibrate once per session; their first call includes it and is
reported separately. Writes a table into bench/README.md with --readme.

    python bench/whatif_speed.py [--zoo DIR] [--n-per-task 48] [--n-generic 0] [--readme]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._common import write_readme_section  # noqa: E402
SECTION = "## What-if merge latency"


def default_params(name: str, n: int):
    """(per-model params, global params) giving each method a typical setting."""
    w = [{"weight": 1.0 / n} for _ in range(n)]
    wd = [{"weight": 1.0, "density": 0.5} for _ in range(n)]
    table = {
        "linear": (w, {}), "task_arithmetic": ([{"weight": 1.0}] * n, {}),
        "ties": (wd, {}), "dare_linear": ([{"weight": 1.0, "density": 0.5}] * n, {}),
        "dare_ties": (wd, {}), "breadcrumbs": ([{"weight": 1.0, "density": 0.5, "gamma": 0.01}] * n, {}),
        "breadcrumbs_ties": ([{"weight": 1.0, "density": 0.5, "gamma": 0.01}] * n, {}),
        "della": ([{"weight": 1.0, "density": 0.5, "epsilon": 0.1}] * n, {}),
        "della_linear": ([{"weight": 1.0, "density": 0.5, "epsilon": 0.1}] * n, {}),
        "slerp": None, "model_stock": ([{}] * n, {}), "consensus": ([{}] * n, {}),
        "tsv": ([{}] * n, {}), "emr": ([{}] * n, {}), "fisher": ([{}] * n, {"calibration": {"n": 32}}),
        "regmean": ([{}] * n, {"calibration": {"n": 32}}), "channel_merging": ([{}] * n, {"num_groups": 4}),
        "sotu": ([{"weight": 1.0, "density": 0.2}] * n, {}),
    }
    return table.get(name, ([{}] * n, {}))


def synthetic_full_zoo(root: Path) -> Path:
    """A zoo-shaped folder with the FULL small architecture and random weights (base + 5
    fine-tunes = base + random deltas): the worst case for decoding, which never stops early."""
    import json

    from engine.io import ModelWriter
    from engine.zoo.build import llama_config
    from engine.zoo.plan import FULL_ARCHS, SMALL_FINETUNE_TASKS
    from engine.evaluate.tokenizer import build_tokenizer
    from transformers import LlamaForCausalLM

    if (root / "zoo.json").is_file():
        return root
    config = llama_config(FULL_ARCHS["small"])
    torch.manual_seed(0)
    state = LlamaForCausalLM(config).state_dict()
    tok = build_tokenizer()
    models = []
    for i, name in enumerate(["base", *SMALL_FINETUNE_TASKS]):
        g = torch.Generator().manual_seed(i)
        weights = {k: v + (0.01 * torch.randn(v.shape, generator=g) if i else 0) for k, v in state.items()}
        with ModelWriter(root / "small" / name, config=config.to_dict()) as w:
            for k, v in weights.items():
                w.add_tensor(k, v.contiguous())
        tok.save_pretrained(root / "small" / name)
        models.append({"path": f"small/{name}", "family": "small", "role": "finetune" if i else "base",
                       "task": name if i else None})
    (root / "zoo.json").write_text(json.dumps({"models": models, "quick": False, "synthetic": True}))
    return root


def main(argv=None) -> int:
    from engine.merge import list_methods
    from engine.merge.whatif import WhatIfSession
    from engine.zoo import load_manifest

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default=None, help="zoo folder (default: $DELTA_WORKBENCH_ZOO or ~/.cache/...)")
    parser.add_argument("--n-per-task", type=int, default=48, help="held-out examples per task (the app's default)")
    parser.add_argument("--n-generic", type=int, default=0, help="generic lines for perplexity (0: skip)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--synthetic-full", default=None, metavar="DIR",
                        help="build (once) and use a random zoo of the full small architecture in DIR")
    parser.add_argument("--readme", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from engine.zoo import default_zoo_dir

    zoo = Path(args.zoo) if args.zoo else default_zoo_dir()
    if args.synthetic_full:
        zoo = synthetic_full_zoo(Path(args.synthetic_full))
    manifest = load_manifest(zoo)
    small = [m for m in manifest["models"] if m["family"] == "small"]
    base = next(m for m in small if m["role"] == "base")
    fts = [m for m in small if m["role"] == "finetune"]
    started = time.perf_counter()
    session = WhatIfSession(base["abs_path"], [m["abs_path"] for m in fts], n_per_task=args.n_per_task,
                            n_generic=args.n_generic, device="cpu")
    open_s = time.perf_counter() - started
    rows = []
    for name in list_methods():
        spec = default_params(name, len(fts))
        if spec is None:  # slerp: the base and one fine-tune
            sub = WhatIfSession(base["abs_path"], [fts[0]["abs_path"]], n_per_task=args.n_per_task,
                                n_generic=args.n_generic, device="cpu")
            runner, mps, params = sub, [{}], {"t": 0.5}
        else:
            runner, (mps, params) = session, spec
        times, first = [], None
        for rep in range(args.reps + 1):
            t = time.perf_counter()
            result = runner.evaluate(name, mps, params)
            elapsed = time.perf_counter() - t
            if rep == 0:
                first = elapsed
            else:
                times.append(elapsed)
        acc = statistics.mean(v["accuracy"] for v in result["tasks"].values())
        rows.append((name, first, statistics.median(times), result["seconds"]["merge"],
                     result["seconds"]["evaluate"], acc))
        print(f"{name:18s} first {first:6.2f}s  median {statistics.median(times):6.2f}s  "
              f"(merge {result['seconds']['merge']:.3f}s, evaluate {result['seconds']['evaluate']:.3f}s)",
              flush=True)
    params_count = sum(t.numel() for t in session.base.values())
    lines = ["| method | first call s (incl. calibration) | per call s, median | merge s | evaluate s |",
             "|---|---|---|---|---|"]
    for name, first, med, merge_s, eval_s, _ in rows:
        lines.append(f"| {name} | {first:.2f} | {med:.2f} | {merge_s:.3f} | {eval_s:.3f} |")
    worst = max(r[2] for r in rows)
    kind = "synthetic full-size (random weights)" if manifest.get("synthetic") else (
        "quick" if manifest.get("quick") else "full")
    conditions = (f"zoo `{kind}` small family: base + {len(fts)} "
                  f"fine-tunes, {params_count / 1e6:.2f}M parameters each; {args.n_per_task} held-out "
                  f"examples per task x {len(result['tasks'])} tasks, perplexity "
                  f"{'on ' + str(args.n_generic) + ' lines' if args.n_generic else 'skipped'}; "
                  f"{args.threads} torch thread(s), {os.cpu_count()} cores shared with other work "
                  f"(load average {os.getloadavg()[0]:.1f}); session opened in {open_s:.1f}s.")
    table = "\n".join(lines)
    print(table)
    print(conditions)
    print(f"slowest per-call median: {worst:.2f}s")
    if args.readme:
        body = (f"`engine.merge.whatif.WhatIfSession.evaluate`: merge in memory (the same per-tensor "
                f"code as `python -m engine merge`) and score on every zoo task, nothing written.\n\n"
                f"Reproduce: `python bench/whatif_speed.py {'--synthetic-full bench/work/synthetic_zoo' if args.synthetic_full else '--zoo ZOO'} "
                f"--n-per-task {args.n_per_task} --readme` (a real zoo: `--zoo ZOO`).\n\n{table}\n\n"
                f"Conditions: {conditions} Slowest per-call median: {worst:.2f} s (target: under 5 s).\n")
        write_readme_section(SECTION, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
