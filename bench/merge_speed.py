"""Merge speed and peak memory, ours vs mergekit, side by side on one machine in one run.

Generates (once) a ~270M-parameter bf16 Llama base and two fine-tunes (random weights; small
random deltas) under bench/work/speed/ (git-ignored), then runs task_arithmetic and ties with
`python -m engine merge` and with `mergekit-yaml` (CPU), each run a separate process measured
by /usr/bin/time -v (wall time, peak RSS), alternating tools so that background load hits
both alike. Reports the median wall time and the largest peak RSS over the repetitions, and
writes a table into bench/README.md with --readme.

The recipes are identical for both tools: `dtype: float32` (mergekit computes in `dtype`; we
always compute in fp32, so the numbers are the same) and `out_dtype: bfloat16`. A second
mergekit variant, `dtype: bfloat16` (its common usage: bf16 arithmetic), is timed with
--mergekit-bf16.

mergekit is not a dependency of the project: install it into its own venv (bench/README.md).

    python bench/merge_speed.py --mergekit VENV/bin/mergekit-yaml [--reps 3] [--readme]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._common import llama_shapes, write_readme_section  # noqa: E402
WORK = ROOT / "bench" / "work" / "speed"
SECTION = "## Merge speed vs mergekit"

# ~270M parameters: 32000 x 1024 embeddings and head (65.5M) + 16 layers x 12.85M
CONFIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
              num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048,
              tie_word_embeddings=False, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)


def generate(work: Path) -> dict[str, Path]:
    """base, ft_a, ft_b as bf16 single-file safetensors folders (skipped when present)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folders = {name: work / name for name in ("base", "ft_a", "ft_b")}
    if all((f / "model.safetensors").is_file() for f in folders.values()):
        return folders
    config = LlamaConfig(**CONFIG)
    config.architectures = ["LlamaForCausalLM"]
    shapes = llama_shapes(CONFIG)
    for i, (name, folder) in enumerate(folders.items()):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        state = {}
        for j, (tensor, shape) in enumerate(shapes.items()):
            g = torch.Generator().manual_seed(j)  # the same base in every model
            if len(shape) == 1:
                w = torch.ones(shape)
            else:
                w = torch.randn(shape, generator=g) * 0.02
            if i:  # a fine-tune: small random delta
                gd = torch.Generator().manual_seed(10_000 * i + j)
                w += torch.randn(shape, generator=gd) * 0.002
            state[tensor] = w.to(torch.bfloat16)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        del state
        config.to_json_file(str(folder / "config.json"))
    return folders


def recipe(method: str, folders: dict[str, Path], dtype: str) -> dict:
    params = {"weight": 0.5} if method == "task_arithmetic" else {"weight": 0.5, "density": 0.5}
    return {"merge_method": method, "base_model": str(folders["base"]), "dtype": dtype,
            "out_dtype": "bfloat16",
            "models": [{"model": str(folders["ft_a"]), "parameters": params},
                       {"model": str(folders["ft_b"]), "parameters": params}]}


def timed(cmd: list[str], env: dict) -> dict:
    """Run cmd under /usr/bin/time -v: wall seconds and peak RSS (MiB)."""
    started = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    user = float(re.search(r"User time \(seconds\): ([\d.]+)", proc.stderr).group(1))
    system = float(re.search(r"System time \(seconds\): ([\d.]+)", proc.stderr).group(1))
    return {"wall_s": wall, "peak_rss_mib": rss_kb / 1024, "cpu_s": user + system}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit", default=os.environ.get("MERGEKIT_YAML", "mergekit-yaml"))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--methods", default="task_arithmetic,ties")
    parser.add_argument("--mergekit-bf16", action="store_true", help="also time mergekit with dtype bfloat16")
    parser.add_argument("--readme", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    exe = shutil.which(args.mergekit) or args.mergekit
    if not Path(exe).exists():
        parser.error(f"mergekit-yaml not found ({args.mergekit}); see bench/README.md")

    WORK.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    folders = generate(WORK)
    print(f"models ready in {time.perf_counter() - t0:.0f}s: {sum(1 for _ in llama_shapes(CONFIG))} tensors, "
          f"{sum(torch.Size(s).numel() for s in llama_shapes(CONFIG).values()) / 1e6:.1f}M parameters", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    variants = [("ours", "float32"), ("mergekit", "float32")]
    if args.mergekit_bf16:
        variants.append(("mergekit", "bfloat16"))
    load_before = os.getloadavg()
    runs: dict[tuple[str, str, str], list[dict]] = {}
    for rep in range(args.reps):
        for method in args.methods.split(","):
            order = variants if rep % 2 == 0 else list(reversed(variants))
            for tool, dtype in order:
                path = WORK / f"{method}_{dtype}.yml"
                path.write_text(yaml.safe_dump(recipe(method, folders, dtype), sort_keys=False))
                out = WORK / "out" / f"{tool}_{method}_{dtype}"
                shutil.rmtree(out, ignore_errors=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                if tool == "ours":
                    cmd = [sys.executable, "-m", "engine", "merge", str(path), "--out", str(out), "--quiet",
                           "--device", "cpu"]
                else:
                    cmd = [exe, str(path), str(out), "--no-cuda", "--quiet"]
                result = timed(cmd, env)
                runs.setdefault((method, tool, dtype), []).append(result)
                print(f"rep {rep} {method:16s} {tool:8s} dtype={dtype:8s} wall {result['wall_s']:7.1f}s "
                      f"cpu {result['cpu_s']:7.1f}s peak RSS {result['peak_rss_mib']:7.0f} MiB "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)
                if rep < args.reps - 1 or tool == "mergekit":
                    shutil.rmtree(out, ignore_errors=True)
    load_after = os.getloadavg()

    rows = []
    for (method, tool, dtype), rs in runs.items():
        rows.append({"method": method, "tool": tool, "dtype": dtype,
                     "wall_s_median": statistics.median(r["wall_s"] for r in rs),
                     "wall_s_all": [round(r["wall_s"], 1) for r in rs],
                     "cpu_s_median": statistics.median(r["cpu_s"] for r in rs),
                     "peak_rss_mib_max": max(r["peak_rss_mib"] for r in rs)})
    lines = ["| method | tool (arithmetic dtype) | wall s, median | wall s, each run | CPU s, median | "
             "peak RSS MiB | ours faster by | RSS ours / mergekit |", "|---|---|---|---|---|---|---|---|"]
    for method in args.methods.split(","):
        ours = next(r for r in rows if r["method"] == method and r["tool"] == "ours")
        for r in [x for x in rows if x["method"] == method]:
            speed = rss = ""
            if r["tool"] == "mergekit":
                speed = f"{r['wall_s_median'] / ours['wall_s_median']:.1f}x"
                rss = f"{ours['peak_rss_mib_max'] / r['peak_rss_mib_max']:.2f}"
            lines.append(f"| {method} | {r['tool']} ({r['dtype'] if r['tool'] == 'mergekit' else 'float32'}) | "
                         f"{r['wall_s_median']:.1f} | {', '.join(map(str, r['wall_s_all']))} | "
                         f"{r['cpu_s_median']:.1f} | {r['peak_rss_mib_max']:.0f} | {speed} | {rss} |")
    mk_version = subprocess.run([str(Path(exe).parent / "python"), "-c",
                                 "import importlib.metadata as m; print(m.version('mergekit'))"],
                                capture_output=True, text=True).stdout.strip() or "?"
    conditions = (f"{os.cpu_count()} CPU cores, torch {torch.__version__}, mergekit {mk_version}; "
                  f"load average {load_before[0]:.1f} before and {load_after[0]:.1f} after "
                  f"(other work shared the cores); {args.reps} runs per row, tools alternating.")
    table = "\n".join(lines)
    print(table)
    print(conditions)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "conditions": conditions}, indent=2))
    if args.readme:
        body = (f"A ~270M-parameter bf16 Llama (16 layers, hidden 1024, vocab 32000, untied) and two "
                f"fine-tunes (random weights, small random deltas), generated by the script under "
                f"`bench/work/` (not in git). Each merge is its own process, timed by `/usr/bin/time -v` "
                f"(wall time, peak RSS); both tools read the same bf16 safetensors, compute in fp32 "
                f"(`dtype: float32`) and write bf16 (`out_dtype: bfloat16`), on the CPU. Ours reads "
                f"tensors with `pread` on a reader thread (no memory map, so input pages never count "
                f"as resident), merges linear/task_arithmetic/ties/breadcrumbs in cache-sized chunks "
                f"(bf16 -> fp32 once per chunk; trim thresholds by sampled bracketing + `kthvalue`, no "
                f"sort) and writes each tensor straight into its place in the shard on a writer "
                f"thread (layout known up front, nothing buffered).\n\n"
                f"Reproduce: `python bench/merge_speed.py --mergekit VENV/bin/mergekit-yaml --readme` "
                f"(mergekit in its own venv: `python -m venv VENV && VENV/bin/pip install torch==2.13.0 "
                f"mergekit`).\n\n{table}\n\nConditions: {conditions}\n")
        write_readme_section(SECTION, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
