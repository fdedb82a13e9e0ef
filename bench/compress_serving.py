"""Serving many fine-tunes from one base: memory held and switch time (engine.compress.DeltaServer).

One base in memory plus every fine-tune of a zoo family as a compressed artifact; switching
rebuilds the chosen fine-tune into one model object in place. Compared with keeping every
fine-tune uncompressed in memory, and with loading the fine-tune's folder from disk.

    python bench/compress_serving.py --zoo ZOO [--family small] [--method delta_dct --ratio 4]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
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

from bench._common import (describe_machine, load_results, machine_conditions, save_results,  # noqa: E402
                           write_marked_section)
from engine.compress import DeltaServer, compress  # noqa: E402
from engine.evaluate import Evaluator  # noqa: E402
from engine.evaluate.loading import load_tokenizer, model_from_config  # noqa: E402
from engine.io import ModelFolder  # noqa: E402
from engine.zoo import default_zoo_dir, load_manifest  # noqa: E402

NAME = "compress_serving"


def rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def render(r: dict) -> str:
    """The README section from a saved record (bench/results/compress_serving.json)."""
    ms = lambda xs: f"{1000 * statistics.median(xs):.1f} ms"  # noqa: E731
    held, tunes = r["held_bytes"], r["tunes"]
    full = r["model_bytes"] * (1 + tunes)
    return "\n".join([
        "## Serving many fine-tunes from one base",
        "",
        f"`engine.compress.DeltaServer`: the `{r['family']}` family's base in memory (fp32) plus its "
        f"{tunes} fine-tunes compressed with `{r['method']}` at {r['ratio']:g}x; a switch rebuilds "
        "the chosen fine-tune into one model object in place.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| held in memory: base + {tunes} compressed deltas | {held / 1024:.0f} KiB "
        f"(base {r['base_bytes'] / 1024:.0f} KiB + deltas {sum(r['delta_bytes'].values()) / 1024:.0f} KiB) |",
        f"| same fine-tunes uncompressed (fp32, base included) | {full / 1024:.0f} KiB "
        f"({full / held:.1f}x more) |",
        f"| process RSS growth when loading the server | {r['rss_growth_bytes'] / 1024:.0f} KiB |",
        f"| server start (read base, check and load {tunes} artifacts) | {1000 * r['load_s']:.0f} ms |",
        f"| switch: rebuild into the model in place (median of {r['rounds']}) | {ms(r['switch_s'])} |",
        f"| rebuild as a new state dict (median) | {ms(r['as_dict_s'])} |",
        f"| for comparison: load the fine-tune's folder from disk (median) | {ms(r['from_disk_s'])} |",
        f"| compress one fine-tune (median) | {statistics.median(r['compress_s']):.2f} s |",
        "",
        "Own-task accuracy after a switch: " + ", ".join(f"{k} {v:.2f}" for k, v in r["accuracy"].items())
        + f" ({r['n']} held-out examples each).",
        "",
        f"Measured with `python bench/compress_serving.py --zoo ZOO --family {r['family']} --method "
        f"{r['method']} --ratio {r['ratio']:g}` on CPU, 1 thread ({describe_machine(r['machine'])}; raw "
        f"numbers in `bench/results/{NAME}.json`, `--render` rewrites this section from them). The zoo's "
        f"models are tiny ({r['model_bytes'] / 1024:.0f} KiB in fp32), so times are dominated by "
        "per-tensor overhead; the memory ratio is the point.",
    ])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=None)
    parser.add_argument("--family", default="small")
    parser.add_argument("--method", default="delta_dct")
    parser.add_argument("--ratio", type=float, default=4)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--n", type=int, default=64, help="held-out examples to check each switch")
    parser.add_argument("--readme", type=Path, default=REPO / "bench" / "README.md")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--render", action="store_true",
                        help="rewrite the README section from bench/results/compress_serving.json; measure nothing")
    args = parser.parse_args(argv)
    if args.render:
        write_marked_section(NAME, render(load_results(NAME)), args.readme)
        return 0
    torch.set_num_threads(1)
    manifest = load_manifest(args.zoo or default_zoo_dir())
    base_entry = next(m for m in manifest["models"] if m["family"] == args.family and m["role"] == "base")
    tunes = [m for m in manifest["models"] if m["family"] == args.family and m["role"] == "finetune"]
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    try:
        arts, compress_s = {}, []
        for m in tunes:
            arts[m["path"]] = work / m["path"].replace("/", "_")
            t0 = time.perf_counter()
            compress(base_entry["abs_path"], m["abs_path"], arts[m["path"]], args.method,
                     ratio=args.ratio, device="cpu")
            compress_s.append(time.perf_counter() - t0)
        rss0 = rss_bytes()
        t0 = time.perf_counter()
        server = DeltaServer(base_entry["abs_path"], device="cpu")
        for name, art in arts.items():
            server.add(name, art)
        load_s = time.perf_counter() - t0
        memory = server.memory()
        rss1 = rss_bytes()
        folder = ModelFolder(base_entry["abs_path"])
        model = model_from_config(folder.config)
        tokenizer = load_tokenizer(base_entry["abs_path"], folder.config.get("vocab_size"))
        names = list(arts)
        switch, as_dict, from_disk = [], [], []
        for r in range(args.rounds):
            name = names[r % len(names)]
            server.materialize(name, into=model)
            switch.append(server.last_switch_s)
            t0 = time.perf_counter()
            server.materialize(name)
            as_dict.append(time.perf_counter() - t0)
            entry = next(m for m in tunes if m["path"] == name)
            t0 = time.perf_counter()
            with ModelFolder(entry["abs_path"]) as ft:
                model.load_state_dict(dict(ft.iter_tensors()), strict=False)
            from_disk.append(time.perf_counter() - t0)
        accuracy = {}
        for m in tunes:
            server.materialize(m["path"], into=model)
            task = m["task"]
            accuracy[m["path"]] = Evaluator(model, tokenizer, [task], args.n, 0).evaluate()["tasks"][task]["accuracy"]
        model_bytes = sum(folder.info(n).numel * 4 for n in folder.tensor_names)
        folder.close()
        server.close()
        record = {
            "family": args.family, "method": args.method, "ratio": args.ratio, "rounds": args.rounds,
            "n": args.n, "tunes": len(tunes), "model_bytes": model_bytes,
            "held_bytes": memory["total_bytes"], "base_bytes": memory["base_bytes"],
            "delta_bytes": dict(memory["delta_bytes"]), "rss_growth_bytes": rss1 - rss0,
            "load_s": load_s, "switch_s": switch, "as_dict_s": as_dict, "from_disk_s": from_disk,
            "compress_s": compress_s, "accuracy": accuracy, "machine": machine_conditions(),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    save_results(NAME, record)
    text = render(record)
    print(text)
    if not args.no_write:
        write_marked_section(NAME, text, args.readme)
    return 0

if __name__ == "__main__":
    sys.exit(main())
