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

from bench._common import write_marked_section  # noqa: E402
from engine.compress import DeltaServer, compress  # noqa: E402
from engine.evaluate import Evaluator  # noqa: E402
from engine.evaluate.loading import load_tokenizer, model_from_config  # noqa: E402
from engine.io import ModelFolder  # noqa: E402
from engine.zoo import default_zoo_dir, load_manifest  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


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
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    manifest = load_manifest(args.zoo or default_zoo_dir())
    base_entry = next(m for m in manifest["models"] if m["family"] == args.family and m["role"] == "base")
    tunes = [m for m in manifest["models"] if m["family"] == args.family and m["role"] == "finetune"]
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    lines = []
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
        held = memory["total_bytes"]
        full = model_bytes * (1 + len(tunes))
        ms = lambda xs: f"{1000 * statistics.median(xs):.1f} ms"  # noqa: E731
        lines = [
            "## Serving many fine-tunes from one base",
            "",
            f"`engine.compress.DeltaServer`: the `{args.family}` family's base in memory (fp32) plus its "
            f"{len(tunes)} fine-tunes compressed with `{args.method}` at {args.ratio:g}x; a switch rebuilds "
            "the chosen fine-tune into one model object in place.",
            "",
            "| measure | value |",
            "|---|---|",
            f"| held in memory: base + {len(tunes)} compressed deltas | {held / 1024:.0f} KiB "
            f"(base {memory['base_bytes'] / 1024:.0f} KiB + deltas {sum(memory['delta_bytes'].values()) / 1024:.0f} KiB) |",
            f"| same fine-tunes uncompressed (fp32, base included) | {full / 1024:.0f} KiB "
            f"({full / held:.1f}x more) |",
            f"| process RSS growth when loading the server | {(rss1 - rss0) / 1024:.0f} KiB |",
            f"| server start (read base, check and load {len(tunes)} artifacts) | {1000 * load_s:.0f} ms |",
            f"| switch: rebuild into the model in place (median of {args.rounds}) | {ms(switch)} |",
            f"| rebuild as a new state dict (median) | {ms(as_dict)} |",
            f"| for comparison: load the fine-tune's folder from disk (median) | {ms(from_disk)} |",
            f"| compress one fine-tune (median) | {statistics.median(compress_s):.2f} s |",
            "",
            "Own-task accuracy after a switch: " + ", ".join(f"{k} {v:.2f}" for k, v in accuracy.items())
            + f" ({args.n} held-out examples each).",
            "",
            f"Measured with `python bench/compress_serving.py --zoo ZOO --family {args.family} --method "
            f"{args.method} --ratio {args.ratio:g}` on CPU, 1 thread. The zoo's models are tiny "
            f"({model_bytes / 1024:.0f} KiB in fp32), so times are dominated by per-tensor overhead; "
            "the memory ratio is the point.",
        ]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_marked_section("compress_serving", text, args.readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
