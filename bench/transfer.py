"""Cross-scale transfer on the full zoo: large/reverse and large/upper into small/base by
PostPKT, LaTen and their controls, 3 seeds, the paper's defaults.

    python bench/transfer.py --zoo ZOO     # measure (a complete, non-quick zoo), write the README section
    python bench/transfer.py --render      # re-render the section from bench/results/transfer.json

Per source and seed: ``postpkt`` and ``postpkt_control`` (with its learning curve), a plain full
fine-tune of the same step budget, ``laten`` and ``laten_control`` with the released script's
translator (after 1 step) and after all 20 steps, and a plain full fine-tune of LaTen's budget
(20 steps of 16 examples). Accuracy: exact match on 128 held-out examples of the task.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (OtherWork, describe_machine, load_results, machine_conditions,
                           save_results, write_readme_section)

SECTION = "## Cross-scale transfer (PostPKT, LaTen)"
SOURCES = {"reverse": "large/reverse", "upper": "large/upper"}
SEEDS = (0, 1, 2)
RUNS = [  # (row label, method, params, with the plain fine-tune of its budget)
    ("PostPKT (extracted LoRA init)", "postpkt", {}, False),
    ("PostPKT control (random LoRA init)", "postpkt_control", {}, True),
    ("LaTen, translator after 1 step (released script)", "laten", {}, False),
    ("LaTen control, after 1 step", "laten_control", {}, False),
    ("LaTen, translator after 20 steps", "laten", {"checkpoint": 20}, False),
    ("LaTen control, after 20 steps", "laten_control", {"checkpoint": 20}, True),
]


def measure(zoo: Path) -> dict:
    from engine.transfer.run import transfer
    from engine.zoo import load_manifest, zoo_complete

    manifest = load_manifest(zoo)
    if manifest.get("quick") or not zoo_complete(manifest):
        raise SystemExit("the transfer bench needs a complete full zoo")
    rows = []
    with OtherWork() as other, tempfile.TemporaryDirectory() as tmp:
        for task, source in SOURCES.items():
            for seed in SEEDS:
                for label, method, params, plain in RUNS:
                    started = time.perf_counter()
                    out = Path(tmp) / f"{task}-{seed}-{len(rows)}"
                    r = transfer(zoo / source, zoo / "large/base", zoo / "small/base", out, method,
                                 task, params, seed=seed, baselines=plain)
                    rows.append({"task": task, "seed": seed, "label": label, "method": method,
                                 "params": params, "accuracy": r.accuracy, "curve": r.curve,
                                 "seconds": round(time.perf_counter() - started, 2)})
                    print(f"{task} seed {seed} {label}: {r.accuracy}", file=sys.stderr, flush=True)
    return {"zoo": "full", "seeds": list(SEEDS), "rows": rows, "other_work": other.record(),
            "machine": machine_conditions(),
            "teacher_accuracy": {t: next(m["accuracy"][t] for m in manifest["models"] if m["path"] == s)
                                 for t, s in SOURCES.items()}}


def _stats(values: list[float]) -> str:
    mean = statistics.fmean(values)
    spread = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {spread:.2f}"


def render(data: dict) -> str:
    lines = ["large/* (d 160, 3 layers) into small/base (d 128, 2 layers), the papers' defaults "
             "(PostPKT: 32 seed samples, r 16, 3 epochs over 1,000 examples at lr 3e-4, batch 64; "
             "LaTen: rate 0.1, 20 extract and 80 align examples). Exact-match accuracy on 128 "
             f"held-out examples, mean ± spread (population std) over seeds {data['seeds']}.",
             "", "| run | " + " | ".join(f"{t} (teacher {data['teacher_accuracy'][t]:.2f})" for t in SOURCES) + " |",
             "|---|" + "---|" * len(SOURCES)]
    rows = data["rows"]

    def cell(label, key):
        vals = {t: [r["accuracy"][key] for r in rows if r["task"] == t and r["label"] == label
                    and key in r["accuracy"]] for t in SOURCES}
        return " | ".join(_stats(v) if v else "-" for v in vals.values())

    first = RUNS[0][0]
    lines.append(f"| small/base (target, untouched) | {cell(first, 'target_base')} |")
    for label, _, _, plain in RUNS:
        lines.append(f"| {label} | {cell(label, 'transferred')} |")
        if plain:
            budget = "PostPKT's" if label.startswith("PostPKT") else "LaTen's"
            lines.append(f"| plain full fine-tune, {budget} step budget | {cell(label, 'plain_finetune')} |")
    curve_lines = []
    for label in (RUNS[0][0], RUNS[1][0]):
        for t in SOURCES:
            curves = [r["curve"] for r in rows if r["task"] == t and r["label"] == label and r["curve"]]
            if curves:
                steps = [c["step"] for c in curves[0]]
                pts = ", ".join(f"{s}: {_stats([c[i]['accuracy'] for c in curves])}" for i, s in enumerate(steps))
                curve_lines.append(f"- {t}, {label}: {pts}")
    lines += ["", "PostPKT learning curves (accuracy at fine-tune step):", *curve_lines]
    lines += ["", f"Measured on {describe_machine(data['machine'])}; raw numbers in `bench/results/transfer.json`."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", help="a complete full zoo folder")
    parser.add_argument("--render", action="store_true", help="re-render from the saved results")
    args = parser.parse_args(argv)
    if args.render:
        data = load_results("transfer")
    else:
        if not args.zoo:
            parser.error("--zoo is needed")
        data = measure(Path(args.zoo).absolute())
        save_results("transfer", data)
    text = render(data)
    print(text)
    write_readme_section(SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
