"""Merge speed and peak memory, ours vs mergekit vs the I/O floor, side by side in one run.

Generates (once) a ~270M-parameter bf16 Llama base and two fine-tunes (random weights; small
random deltas) under bench/work/speed/ (git-ignored), then times each method with
`python -m engine merge` and with `mergekit-yaml` (CPU), each run a separate process measured
by /usr/bin/time -v (wall time, CPU time, peak RSS), the tools alternating from one repetition
to the next so that background load hits both alike. Each repetition also times the floor: a
process that imports torch and safetensors, reads every input tensor's bytes once (plain
reads at the offsets the safetensors headers give, into reused buffers) and writes and fsyncs
the output's bytes once (a plain loop on one thread, no arithmetic, no checks).

Our runs record seconds per stage (`merge --timings`: read, convert, merge, check, write,
verify, hash, fsync, finalize, and the merge thread's waits), so the next bottleneck is visible.

The recipes are identical for both tools: `dtype: float32` (mergekit computes in `dtype`; we
always compute in fp32, so the numbers are the same) and `out_dtype: bfloat16`. A second
mergekit variant, `dtype: bfloat16` (bf16 arithmetic), is timed with --mergekit-bf16.

The machine must be idle: the CPU time other processes used during the run (/proc/stat's busy
time less the bench's own processes') is recorded with the load averages, and the README table
is refused when it is above 0.5 busy cores per core, unless --force-loaded is given (the table then
says so). Raw numbers of every run go to --json (default bench/work/speed/last.json); with
--readme they go to bench/results/merge_speed.json and the README section is rendered from
that file (--render re-renders it without measuring).

mergekit is not a dependency of the project: install it into its own venv (bench/README.md).

    python bench/merge_speed.py --mergekit VENV/bin/mergekit-yaml [--reps 3] [--readme]
    python bench/merge_speed.py --ours-only [--methods task_arithmetic]   # develop: ours + floor
    python bench/merge_speed.py --mergekit ... --size 1b --methods task_arithmetic,linear --readme
"""

from __future__ import annotations

import argparse
import copy
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
from bench._common import OtherWork, llama_shapes, write_readme_section  # noqa: E402
from engine.io import shard  # noqa: E402

WORK = ROOT / "bench" / "work" / "speed"
RESULTS = ROOT / "bench" / "results" / "merge_speed.json"
SECTION = "## Merge speed vs mergekit"
# --methods newer / other --readme: their own results file and README section (the headline
# table keeps its run)
RESULTS_NEWER = ROOT / "bench" / "results" / "merge_speed_newer.json"
SECTION_NEWER = "## Newer mergekit methods: merge speed vs mergekit"
RESULTS_OTHER = ROOT / "bench" / "results" / "merge_speed_other.json"
SECTION_OTHER = "## Other task-vector methods: merge speed vs mergekit"
LOAD_LIMIT_PER_CORE = 0.5
MAIN_METHODS = ("task_arithmetic", "ties", "linear", "slerp")
# every other method both tools have (--methods shared times them all)
OTHER_SHARED = ("breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties", "della", "della_linear",
                "model_stock")
# mergekit 0.1.5's methods added later (--methods newer times them; 'shared' includes them)
NEWER_SHARED = ("nuslerp", "multislerp", "karcher", "sce", "arcee_fusion", "nearswap", "ram", "ramplus_tl",
                "passthrough")

# ~270M parameters: 32000 x 1024 embeddings and head (65.5M) + 16 layers x 12.85M
CONFIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
              num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048,
              tie_word_embeddings=False, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
# --size 1b: ~954M parameters (hidden 2048, intermediate 5632: 65.5M x 2 + 16 layers x 51.4M),
# where starting Python and importing torch (~2-3 s, in every tool and in the floor) is a small
# share of a merge: its own work folder, results file and README section
SIZES = {
    "270m": (CONFIG, "speed", RESULTS, SECTION),
    "1b": ({**CONFIG, "hidden_size": 2048, "intermediate_size": 5632}, "speed_1b",
           ROOT / "bench" / "results" / "merge_speed_1b.json", "## Merge speed vs mergekit: a 1B-parameter triple"),
}

# The floor: every input tensor's bytes read once into memory (one reused buffer per input, as
# plain file reads at the offsets the safetensors header gives), the output's bytes written
# once (the base's bytes stand in for the merged ones: the same layout and size), fsynced.
# A plain loop on one thread: no arithmetic, no conversion, no checks.
FLOOR = r"""
import json, os, struct, sys, time
out, inputs = sys.argv[1], sys.argv[2:]
started = time.perf_counter()
import torch, safetensors  # both tools import these: so does the floor
fds, headers = [], []
for folder in inputs:
    fd = os.open(os.path.join(folder, "model.safetensors"), os.O_RDONLY)
    n = struct.unpack("<Q", os.pread(fd, 8, 0))[0]
    raw = os.pread(fd, n, 8)
    fds.append(fd)
    headers.append((8 + n, raw, json.loads(raw)))
start0, raw0, header0 = headers[0]
names = sorted((k for k in header0 if k != "__metadata__"), key=lambda k: header0[k]["data_offsets"][0])
largest = max(e - b for b, e in (header0[k]["data_offsets"] for k in names))
buffers = [memoryview(bytearray(largest)) for _ in inputs]
out_fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
os.write(out_fd, struct.pack("<Q", len(raw0)) + raw0)
read = write = 0.0
nread = nwritten = 0
for name in names:
    t0 = time.perf_counter()
    for fd, buf, (start, _, header) in zip(fds, buffers, headers):
        b, e = header[name]["data_offsets"]
        done = 0
        while done < e - b:
            done += os.preadv(fd, [buf[done:e - b]], start + b + done)
        nread += e - b
    t1 = time.perf_counter()
    b, e = header0[name]["data_offsets"]
    done = 0
    while done < e - b:
        done += os.write(out_fd, buffers[0][done:e - b])
    nwritten += e - b
    t2 = time.perf_counter()
    read, write = read + t1 - t0, write + t2 - t1
t0 = time.perf_counter()
os.fsync(out_fd)
os.close(out_fd)
fsync = time.perf_counter() - t0
print(json.dumps({"read_s": read, "write_s": write, "fsync_s": fsync, "bytes_read": nread,
                  "bytes_written": nwritten, "in_process_s": time.perf_counter() - started}))
"""


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
    """The same recipe for both tools (no shared objects: YAML anchors are refused by us)."""
    base, a, b = (str(folders[k]) for k in ("base", "ft_a", "ft_b"))
    common = {"dtype": dtype, "out_dtype": "bfloat16"}
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": base, "models": [{"model": base}, {"model": a}],
                "parameters": {"t": 0.5}, **common}
    if method in ("model_stock", "sce", "ram", "karcher"):
        # no per-model parameters (karcher: base-free, its defaults max_iter 10, tol 1e-5)
        return {"merge_method": method, **({} if method == "karcher" else {"base_model": base}),
                "models": [{"model": a}, {"model": b}], **common}
    if method in ("arcee_fusion", "nearswap"):  # one fine-tune into its base
        return {"merge_method": method, "base_model": base, "models": [{"model": a}],
                **({"parameters": {"t": 0.5}} if method == "nearswap" else {}), **common}
    if method == "passthrough":  # a 16-layer frankenmerge: ft_a's first half, ft_b's second half
        n = CONFIG["num_hidden_layers"]
        return {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": a, "layer_range": [0, n // 2]}]},
            {"sources": [{"model": b, "layer_range": [n // 2, n]}]}], **common}
    if method == "ramplus_tl":
        return {"merge_method": method, "base_model": base, "models": [{"model": a}, {"model": b}],
                "parameters": {"r": 0.5, "alpha": 0.5}, **common}
    params = {"weight": 0.5}
    if method in ("ties", "dare_ties", "dare_linear", "della", "della_linear"):
        params["density"] = 0.5
    if method.startswith("della"):
        params["epsilon"] = 0.1
    if method.startswith("breadcrumbs"):
        params.update(density=0.8, gamma=0.05)
    models = [{"model": m, "parameters": copy.deepcopy(params)} for m in (a, b)]
    if method in ("linear", "multislerp"):
        return {"merge_method": method, "models": models, **common}
    return {"merge_method": method, "base_model": base, "models": models, **common}


def timed(cmd: list[str], env: dict) -> dict:
    """Run cmd under /usr/bin/time -v: wall seconds, CPU seconds, peak RSS (MiB), stdout."""
    started = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    user = float(re.search(r"User time \(seconds\): ([\d.]+)", proc.stderr).group(1))
    system = float(re.search(r"System time \(seconds\): ([\d.]+)", proc.stderr).group(1))
    return {"wall_s": round(wall, 3), "cpu_s": round(user + system, 3),
            "peak_rss_mib": round(rss_kb / 1024, 1), "stdout": proc.stdout}


def run_one(tool: str, method: str | None, dtype: str, folders: dict, exe: str, env: dict) -> dict:
    out = WORK / "out" / f"{tool}_{method}_{dtype}"
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    if tool == "floor":
        out.mkdir()
        cmd = [sys.executable, "-c", FLOOR, str(out / "model.safetensors"),
               *(str(folders[k]) for k in ("base", "ft_a", "ft_b"))]
    else:
        path = WORK / f"{method}_{dtype}.yml"
        path.write_text(yaml.safe_dump(recipe(method, folders, dtype), sort_keys=False))
        if tool == "ours":
            cmd = [sys.executable, "-m", "engine", "merge", str(path), "--out", str(out), "--quiet",
                   "--device", "cpu", "--timings", str(WORK / "timings.json")]
        else:
            cmd = [exe, str(path), str(out), "--no-cuda", "--quiet"]
    load = os.getloadavg()[0]
    result = timed(cmd, env)
    stdout = result.pop("stdout")
    result.update(tool=tool, method=method, dtype=dtype, load_1m_before=round(load, 2))
    if tool == "floor":
        result["io"] = {k: round(v, 3) if isinstance(v, float) else v
                        for k, v in json.loads(stdout.strip().splitlines()[-1]).items()}
    if tool == "ours":
        result["stages"] = json.loads((WORK / "timings.json").read_text())["seconds"]
    shutil.rmtree(out, ignore_errors=True)
    return result


def summarize(runs: list[dict]) -> list[dict]:
    rows = []
    for key in dict.fromkeys((r["tool"], r["method"], r["dtype"]) for r in runs):
        rs = [r for r in runs if (r["tool"], r["method"], r["dtype"]) == key]
        row = {"tool": key[0], "method": key[1], "dtype": key[2],
               "wall_s_median": round(statistics.median(r["wall_s"] for r in rs), 3),
               "wall_s_all": [r["wall_s"] for r in rs],
               "cpu_s_median": round(statistics.median(r["cpu_s"] for r in rs), 3),
               "peak_rss_mib_max": max(r["peak_rss_mib"] for r in rs)}
        if key[0] == "ours":
            stages = sorted({s for r in rs for s in r["stages"] if s != "cpu"})
            row["stages_median"] = {s: round(statistics.median(r["stages"].get(s, 0.0) for r in rs), 3)
                                    for s in stages}
            row["stages_cpu_median"] = {s: round(statistics.median(r["stages"].get("cpu", {}).get(s, 0.0)
                                                                   for r in rs), 3) for s in stages}
        rows.append(row)
    return rows


def group_of(results: dict) -> tuple[str, Path, str]:
    """(the --methods value that reproduces it, its results file, its README section): the
    newer methods and the other task-vector methods each have their own, the rest the headline's."""
    methods = set(results["methods"])
    size = results.get("conditions", {}).get("size", "270m")
    if size != "270m":
        return f"--size {size} --methods {','.join(results['methods'])} --readme", *SIZES[size][2:]
    if methods and methods <= set(NEWER_SHARED):
        return "--methods newer --readme", RESULTS_NEWER, SECTION_NEWER
    if methods and methods <= set(OTHER_SHARED):
        return "--methods other --readme", RESULTS_OTHER, SECTION_OTHER
    return "--readme", RESULTS, SECTION


def _table(rows: list[dict], methods: list[str]) -> list[str]:
    """The wall/CPU/RSS table of one run: each method's rows, then the floor's."""
    floor = next(r for r in rows if r["tool"] == "floor")
    lines = ["| method | tool (arithmetic dtype) | wall s, median | wall s, each run | CPU s, median | "
             "peak RSS MiB | ours faster by | RSS ours / mergekit | ours / floor |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method in methods:
        ours = next(r for r in rows if r["method"] == method and r["tool"] == "ours")
        for r in [x for x in rows if x["method"] == method]:
            speed = rss = vs_floor = ""
            if r["tool"] == "mergekit":
                speed = f"{r['wall_s_median'] / ours['wall_s_median']:.2f}x"
                rss = f"{ours['peak_rss_mib_max'] / r['peak_rss_mib_max']:.2f}"
            else:
                vs_floor = f"{r['wall_s_median'] / floor['wall_s_median']:.2f}x"
            dtype = r["dtype"] if r["tool"] == "mergekit" else "float32"
            lines.append(f"| {method} | {r['tool']} ({dtype}) | {r['wall_s_median']:.2f} | "
                         f"{', '.join(f'{w:.2f}' for w in r['wall_s_all'])} | {r['cpu_s_median']:.1f} | "
                         f"{r['peak_rss_mib_max']:.0f} | {speed} | {rss} | {vs_floor} |")
    lines.append(f"| (any) | floor: read inputs once + write and fsync the output once | "
                 f"{floor['wall_s_median']:.2f} | {', '.join(f'{w:.2f}' for w in floor['wall_s_all'])} | "
                 f"{floor['cpu_s_median']:.1f} | {floor['peak_rss_mib_max']:.0f} |  |  | 1.00x |")
    return lines


def render(results: dict) -> str:
    """The README section body, from the JSON results alone."""
    rows, cond = results["rows"], results["conditions"]
    flag, raw_file, _ = group_of(results)
    raw = raw_file.name
    lines = _table(rows, results["methods"])
    ours_rows = [r for r in rows if r["tool"] == "ours"]
    stages = [s for s in ("plan", "read", "convert", "merge", "check", "write", "verify", "hash",
                          "fsync", "finalize", "wait_read", "wait_write")
              if any(s in r["stages_median"] for r in ours_rows)]
    stage_lines = ["| method | " + " | ".join(stages) + " |", "|---|" + "---|" * len(stages)]
    for r in ours_rows:
        cells = [f"{r['stages_median'].get(s, 0.0):.2f} ({r['stages_cpu_median'].get(s, 0.0):.2f})"
                 for s in stages]
        stage_lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    floor_io = statistics.median(x["io"]["read_s"] + x["io"]["write_s"] + x["io"]["fsync_s"]
                                 for x in results["runs"] if x["tool"] == "floor")
    busy = cond.get("other_work", {}).get("other_busy_cores")
    other = f"other processes kept {busy:.2f} cores busy on average" if busy is not None else ""
    why = f"{other}: " if other else ""
    loaded = (f"**measured under load** ({why}above {LOAD_LIMIT_PER_CORE} per core; --force-loaded)"
              if cond["loaded"] else f"an idle machine ({other})" if other else "an idle machine")
    return (
        f"A ~{round(cond.get('parameters_m', 270), -1):.0f}M-parameter bf16 Llama "
        f"({cond.get('layers', 16)} layers, hidden {cond.get('hidden', 1024)}, vocab 32000, untied) and two fine-tunes "
        "(random weights, small random deltas), generated by the script under `bench/work/` (not in git). "
        "Each merge is its own process, timed by `/usr/bin/time -v` (wall time, CPU time, peak RSS); "
        "both tools read the same bf16 safetensors, compute in fp32 (`dtype: float32`) and write bf16 "
        "(`out_dtype: bfloat16`), on the CPU. The floor, measured in the same run, is a process that "
        "imports torch and safetensors, reads every input tensor's bytes once (plain reads at the "
        "offsets of the safetensors headers, into reused buffers) and writes and fsyncs the output's "
        f"bytes once, in a plain loop on one thread (no arithmetic, no checks; {floor_io:.2f} s of it "
        "reading, writing and fsyncing, the rest starting Python and importing torch, as both tools "
        "do).\n\n"
        "Ours reads tensors with `pread` on a reader thread into reused buffers (no memory map), "
        "merges linear, slerp and the task-arithmetic family in cache-sized chunks (bf16 -> fp32 once "
        "per chunk; trim thresholds by sampled bracketing: one pass for every model's threshold, numpy "
        "compacting the band around it and sorting that; the trim and sign-election "
        "kernels split large tensors over two threads), writes each tensor in place in its shard on "
        "a writer thread, and a checker thread reads it back, compares it and feeds the manifest's "
        "sha256 while it is still in memory (no second pass over the output)." + (
            " Since 2026-12-02 the chunked kernels reuse their chunk buffers (128Ki entries since "
            "2026-12-03, 64Ki before), TIES' trim "
            "is one `hardshrink` and its sign election two operations per model, Arcee Fusion finds "
            "its three quartiles in one bracketing pass, and `python -m engine` ends without the "
            "interpreter's teardown (threads joined, atexit handlers run, output flushed, then "
            "`os._exit`; the teardown alone took ~0.7 s with torch loaded)."
            if results["conditions"].get("fast_exit") else "") + (
            " Since 2026-12-04 a shard whose tensors come in file order (a merge's do) is written "
            "with direct I/O (`O_DIRECT`): the bytes go through an aligned 16 MiB buffer straight "
            "to the disk, so the kernel fills no page cache for the output (on this VM's ext4 a new "
            "file's buffered writes cost ~2 s of CPU per GiB) and the final fsync has nothing left "
            "to write; the checker reads each tensor back from the disk itself, 8 MiB at a time "
            "with the next piece read ahead, and compares it with one `memcmp`."
            if results["conditions"].get("direct_io") else "") + (
            " Since 2026-12-05 `python -m engine` imports its commands' modules (torch among them) "
            "with Python's cyclic garbage collector off and then freezes what they made "
            "(`gc.freeze`), the collector on again for the merge itself: the collector had been "
            "traversing the hundreds of thousands of objects the imports make ~400 times while "
            "they were made, 0.2-0.27 s of each merge."
            if results["conditions"].get("frozen_imports") else "") + "\n\n"
        f"Reproduce: `python bench/merge_speed.py --mergekit VENV/bin/mergekit-yaml {flag}` on an idle "
        f"machine (mergekit in its own venv: `python -m venv VENV && VENV/bin/pip install torch==2.13.0 "
        f"mergekit`); raw numbers of every run: `bench/results/{raw}`.\n\n"
        + "\n".join(lines) + "\n\n"
        "Where our time goes (median seconds per stage, wall (CPU of the thread that ran it); stages "
        "run on four threads at once (reader: read; merge: plan, merge, check and the waits; writer: "
        "write; checker: verify, hash), so they overlap and add up to more than the wall time; "
        "`convert` is inside `merge` for the chunked kernels; `write` includes the writer's waits for "
        "the checker; `finalize` includes the final fsync):\n\n" + "\n".join(stage_lines) + "\n\n"
        f"Conditions: {cond['cpus']} CPU cores, torch {cond['torch']}, mergekit {cond['mergekit']}; load "
        f"average {cond['load_before'][0]:.2f} before and {cond['load_after'][0]:.2f} after, {loaded}; "
        f"{cond['reps']} run{'s' if cond['reps'] != 1 else ''} per row, tools alternating." + (f" {cond['note']}" if cond.get("note") else "") + "\n"
        + "".join(_amendment(a) for a in results.get("amended", [])))


def _amendment(amend: dict) -> str:
    """A later run of some methods only (``--amend``), after a change to them: its own table
    and floor; the rows above are kept as they were measured."""
    cond = amend["conditions"]
    busy = cond.get("other_work", {}).get("other_busy_cores")
    loaded = (f"measured under load (other processes kept {busy:.2f} cores busy on average)"
              if cond["loaded"] else "on an idle machine")
    return (f"\nRe-measured on {cond['date']} ({', '.join(amend['methods'])}), {loaded}, "
            f"{cond['reps']} run{'s' if cond['reps'] != 1 else ''} per row, tools alternating"
            + (f": {amend['note']}" if amend.get("note") else ".") + "\n\n"
            + "\n".join(_table(amend["rows"], amend["methods"])) + "\n")


def mergekit_version(exe: str | None) -> str:
    if exe is None:
        return "-"
    proc = subprocess.run([str(Path(exe).parent / "python"), "-c",
                           "import importlib.metadata as m; print(m.version('mergekit'))"],
                          capture_output=True, text=True)
    return proc.stdout.strip() or "?"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit", default=os.environ.get("MERGEKIT_YAML", "mergekit-yaml"))
    parser.add_argument("--ours-only", action="store_true", help="time ours and the floor only")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--methods", default=",".join(MAIN_METHODS),
                        help=f"comma-separated; 'shared' = {', '.join(MAIN_METHODS + OTHER_SHARED + NEWER_SHARED)}; "
                             "'newer' = the last " + str(len(NEWER_SHARED)) + "; 'other' = "
                             + ", ".join(OTHER_SHARED))
    parser.add_argument("--mergekit-bf16", action="store_true", help="also time mergekit with dtype bfloat16")
    parser.add_argument("--readme", action="store_true",
                        help="write bench/results/merge_speed.json and the README section (idle machine only)")
    parser.add_argument("--note", default=None, help="a sentence about the run's conditions, kept in the results")
    parser.add_argument("--force-loaded", action="store_true",
                        help=f"write the README even above a load of {LOAD_LIMIT_PER_CORE} per core")
    parser.add_argument("--amend", action="store_true",
                        help="with --readme: add this run of some methods below the recorded run (after a change "
                             "to them), keeping the recorded rows")
    parser.add_argument("--render", action="store_true",
                        help="only re-render the README section from bench/results/merge_speed.json")
    parser.add_argument("--size", choices=sorted(SIZES), default="270m",
                        help="the triple: ~270M parameters (the headline) or ~954M (its own section)")
    parser.add_argument("--json", default=None, help="raw numbers of this run (default WORK/last.json)")
    args = parser.parse_args(argv)
    global CONFIG, WORK
    CONFIG, folder = SIZES[args.size][:2]
    WORK = ROOT / "bench" / "work" / folder
    args.json = args.json or str(WORK / "last.json")
    if args.render:
        write_readme_section(SECTION, render(json.loads(RESULTS.read_text())))
        for results_file, section in ((RESULTS_NEWER, SECTION_NEWER), (RESULTS_OTHER, SECTION_OTHER),
                                      SIZES["1b"][2:]):
            if results_file.is_file():
                write_readme_section(section, render(json.loads(results_file.read_text())))
        return 0
    if args.readme and args.ours_only:
        parser.error("--readme needs mergekit (not --ours-only)")
    exe = None
    if not args.ours_only:
        exe = shutil.which(args.mergekit) or args.mergekit
        if not Path(exe).exists():
            parser.error(f"mergekit-yaml not found ({args.mergekit}); see bench/README.md")
    methods = ({"shared": list(MAIN_METHODS + OTHER_SHARED + NEWER_SHARED), "newer": list(NEWER_SHARED),
                "other": list(OTHER_SHARED)}
               .get(args.methods) or args.methods.split(","))

    WORK.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    folders = generate(WORK)
    shapes = llama_shapes(CONFIG)
    print(f"models ready in {time.perf_counter() - t0:.0f}s: {len(shapes)} tensors, "
          f"{sum(torch.Size(s).numel() for s in shapes.values()) / 1e6:.1f}M parameters", flush=True)
    for folder in folders.values():  # every tool then reads the inputs from the page cache
        with open(folder / "model.safetensors", "rb") as handle:
            while handle.read(1 << 24):
                pass
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    variants = [("ours", "float32")]
    if exe is not None:
        variants.append(("mergekit", "float32"))
        if args.mergekit_bf16:
            variants.append(("mergekit", "bfloat16"))
    cpus = os.cpu_count() or 1
    load_before = os.getloadavg()
    runs: list[dict] = []
    other = OtherWork().__enter__()
    for rep in range(args.reps):
        jobs = [("floor", None, "bfloat16")] + [(tool, m, d) for m in methods for tool, d in variants]
        for tool, method, dtype in (jobs if rep % 2 == 0 else list(reversed(jobs))):
            result = run_one(tool, method, dtype, folders, exe, env)
            result["rep"] = rep
            runs.append(result)
            print(f"rep {rep} {method or '-':16s} {tool:8s} dtype={dtype:8s} wall {result['wall_s']:7.2f}s "
                  f"cpu {result['cpu_s']:7.2f}s peak RSS {result['peak_rss_mib']:7.0f} MiB "
                  f"(load {result['load_1m_before']:.2f})", flush=True)
    other.__exit__(None, None, None)
    load_after = os.getloadavg()
    # the gate: other processes' CPU while the bench ran (the load average counts the bench)
    loaded = other.other_cores > LOAD_LIMIT_PER_CORE * cpus
    results = {
        "conditions": {"cpus": cpus, "torch": torch.__version__, "mergekit": mergekit_version(exe),
                       "load_before": [round(x, 2) for x in load_before],
                       "load_after": [round(x, 2) for x in load_after],
                       "load_limit_per_core": LOAD_LIMIT_PER_CORE, "loaded": loaded,
                       "other_work": other.record(), "note": args.note,
                       "reps": args.reps, "date": time.strftime("%Y-%m-%d"), "size": args.size,
                       "parameters_m": round(sum(torch.Size(x).numel() for x in shapes.values()) / 1e6, 1),
                       "layers": CONFIG["num_hidden_layers"], "hidden": CONFIG["hidden_size"],
                       # the engine ends without the interpreter's teardown (engine/__main__.py)
                       "fast_exit": True,
                       # our shards written with O_DIRECT (engine/io/shard.py), where WORK takes it
                       "direct_io": shard.DIRECT_IO and shard.direct_io_works(WORK),
                       # python -m engine imports with the collector off, then freezes
                       "frozen_imports": True},
        "methods": methods, "rows": summarize(runs), "runs": runs,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    for row in results["rows"]:
        extra = f" stages {row['stages_median']}" if "stages_median" in row else ""
        print(f"{row['tool']:8s} {row['method'] or '-':16s} median {row['wall_s_median']:.2f}s "
              f"each {row['wall_s_all']} cpu {row['cpu_s_median']:.2f}s rss {row['peak_rss_mib_max']:.0f}{extra}")
    print(f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after ({cpus} cores); other "
          f"processes kept {other.other_cores:.2f} cores busy on average; raw: {args.json}")
    if args.readme:
        if loaded and not args.force_loaded:
            print(f"refusing to write the README: other work above {LOAD_LIMIT_PER_CORE} busy cores per core "
                  "(rerun on an idle machine, or pass --force-loaded)", file=sys.stderr)
            return 2
        _, results_file, section = group_of(results)
        if args.amend:
            recorded = json.loads(results_file.read_text())
            recorded.setdefault("amended", []).append({"methods": methods, "note": args.note,
                                                       "conditions": results["conditions"],
                                                       "rows": results["rows"], "runs": results["runs"]})
            results = recorded
        results_file.write_text(json.dumps(results, indent=2) + "\n")
        write_readme_section(section, render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
