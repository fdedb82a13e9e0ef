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
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._common import (load_results, machine_conditions, save_results, typical_merge_settings,  # noqa: E402
                           write_readme_section)
SECTION = "## What-if merge latency"
NAME = "whatif_speed"


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
    parser.add_argument("--render", action="store_true",
                        help="rewrite the README section from bench/results/whatif_speed.json; measure nothing")
    args = parser.parse_args(argv)
    if args.render:
        write_readme_section(SECTION, render(load_results(NAME)))
        return 0
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
    sessions = {len(fts): session}
    for name in list_methods():
        used, mps, params = typical_merge_settings(name, len(fts))
        if used not in sessions:  # a method taking fewer fine-tunes: the first ``used`` of them
            sessions[used] = WhatIfSession(base["abs_path"], [m["abs_path"] for m in fts[:used]],
                                           n_per_task=args.n_per_task, n_generic=args.n_generic, device="cpu")
        runner = sessions[used]
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
        rows.append((name, used, first, statistics.median(times), result["seconds"]["merge"],
                     result["seconds"]["evaluate"], acc))
        print(f"{name:18s} first {first:6.2f}s  median {statistics.median(times):6.2f}s  "
              f"(merge {result['seconds']['merge']:.3f}s, evaluate {result['seconds']['evaluate']:.3f}s)",
              flush=True)
    params_count = sum(t.numel() for t in session.base.values())
    kind = "synthetic full-size (random weights)" if manifest.get("synthetic") else (
        "quick" if manifest.get("quick") else "full")
    record = {
        "zoo_kind": kind, "fine_tunes": len(fts), "parameters": params_count,
        "n_per_task": args.n_per_task, "n_generic": args.n_generic, "tasks": len(result["tasks"]),
        "threads": args.threads, "reps": args.reps, "open_s": open_s,
        "synthetic_full": bool(args.synthetic_full), "machine": machine_conditions(),
        "rows": [{"method": name, "fine_tunes": used, "first_s": first, "median_s": med, "merge_s": merge_s,
                  "evaluate_s": eval_s, "mean_accuracy": acc}
                 for name, used, first, med, merge_s, eval_s, acc in rows],
    }
    save_results(NAME, record)
    body = render(record)
    print(body)
    if args.readme:
        write_readme_section(SECTION, body)
    return 0


def render(r: dict) -> str:
    """The README section from a saved record (bench/results/whatif_speed.json)."""
    lines = ["| method | fine-tunes | first call s (incl. calibration) | per call s, median | merge s | evaluate s |",
             "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['method']} | {row['fine_tunes']} | {row['first_s']:.2f} | {row['median_s']:.2f} | "
                     f"{row['merge_s']:.3f} | {row['evaluate_s']:.3f} |")
    worst = max(row["median_s"] for row in r["rows"])
    m = r["machine"]
    conditions = (f"zoo `{r['zoo_kind']}` small family: base + {r['fine_tunes']} "
                  f"fine-tunes, {r['parameters'] / 1e6:.2f}M parameters each; {r['n_per_task']} held-out "
                  f"examples per task x {r['tasks']} tasks, perplexity "
                  f"{'on ' + str(r['n_generic']) + ' lines' if r['n_generic'] else 'skipped'}; "
                  f"{r['threads']} torch thread(s), {m['cores']} cores (load average "
                  f"{m['load_average_1m']:.1f} at the end), measured {m['date']}; session opened in "
                  f"{r['open_s']:.1f}s.")
    where = "--synthetic-full bench/work/synthetic_zoo" if r["synthetic_full"] else "--zoo ZOO"
    return (f"`engine.merge.whatif.WhatIfSession.evaluate`: merge in memory (the same per-tensor "
            f"code as `python -m engine merge`) and score on every zoo task, nothing written.\n\n"
            f"Reproduce: `python bench/whatif_speed.py {where} --n-per-task {r['n_per_task']} --readme`"
            f"{' (a real zoo: `--zoo ZOO`)' if r['synthetic_full'] else ''}; raw numbers in `bench/results/{NAME}.json`, `--render` rewrites "
            f"this section from them.\n\n" + "\n".join(lines) + "\n\n"
            f"Conditions: {conditions} Slowest per-call median: {worst:.2f} s (target: under 5 s).\n")

if __name__ == "__main__":
    raise SystemExit(main())
