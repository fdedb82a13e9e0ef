"""Delta analysis on a ~270M-parameter bf16 Llama pair: cold vs cached, and accuracy.

Generates (once) a base and a fine-tune under bench/work/analysis/ (git-ignored), written with
the project's ModelWriter: random bf16 weights (std 0.02); the fine-tune adds to every matrix a
rank-16 part with decaying singular values plus dense noise (to every vector, noise only), so
the deltas have a real spectrum. Then:

1. ``python -m engine analyze --base B --finetuned F --json`` cold (empty cache file) and again
   (cached), each a separate process under /usr/bin/time -v (wall, peak RSS); the JSON's own
   ``seconds`` gives the in-process time without interpreter start and imports;
2. an independent float64 reference: every tensor read with ``safetensors.torch.load_file``,
   converted to float64, subtracted, and measured with numpy (``np.linalg.norm``,
   ``np.linalg.svd``, LAPACK gesdd); Frobenius norms, top singular values and the full-spectrum
   metrics of the default (auto) run are compared with it;
3. the same analysis in process with every matrix forced through randomized SVD, timed and
   compared with the reference (top-k values, stable rank, and the tail-model estimates of
   effective rank and energy k).

Results go to bench/out/analysis.json; ``--readme`` writes the section of bench/README.md.

    python bench/analysis_bench.py [--threads 2] [--readme]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._common import write_readme_section, llama_shapes  # noqa: E402
WORK = ROOT / "bench" / "work" / "analysis"
OUT = ROOT / "bench" / "results" / "analysis.json"
SECTION = "## Delta analysis: speed, cache and accuracy"

# ~270M parameters: 32000 x 1024 embeddings and head (65.5M) + 16 layers x 12.85M
CONFIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
              num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048,
              tie_word_embeddings=False, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
              model_type="llama", architectures=["LlamaForCausalLM"])
DELTA_RANK = 16
TOP_K = 16


def _delta(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if len(shape) == 1:
        return 1e-3 * torch.randn(shape, generator=g)
    m, n = shape
    u, _ = torch.linalg.qr(torch.randn(m, DELTA_RANK, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, DELTA_RANK, generator=g))
    # low-rank part: singular values 0.5 / (1 + j)^0.7 * sqrt(min dim) / 32, noise std 2e-4
    scale = 0.5 * math.sqrt(min(m, n)) / 32
    s = scale / torch.arange(1, DELTA_RANK + 1, dtype=torch.float32) ** 0.7
    return (u * s) @ v.T + 2e-4 * torch.randn(m, n, generator=g)


def generate(work: Path, config: dict) -> tuple[Path, Path]:
    """base and fine-tune folders (skipped when both are complete)."""
    from engine.io import ModelWriter

    base_dir, ft_dir = work / "base", work / "finetune"
    if all((d / "config.json").is_file() for d in (base_dir, ft_dir)):
        return base_dir, ft_dir
    for d in (base_dir, ft_dir):
        shutil.rmtree(d, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    shapes = llama_shapes(config)
    with ModelWriter(base_dir, config=dict(config), max_shard_bytes=2**30) as wb, \
            ModelWriter(ft_dir, config=dict(config), max_shard_bytes=2**30) as wf:
        for j, (name, shape) in enumerate(shapes.items()):
            g = torch.Generator().manual_seed(j)
            w = torch.ones(shape) if len(shape) == 1 else 0.02 * torch.randn(shape, generator=g)
            wb.add_tensor(name, w.to(torch.bfloat16))
            wf.add_tensor(name, (w + _delta(shape, 100_000 + j)).to(torch.bfloat16))
            del w
    return base_dir, ft_dir


def timed_cli(args: list[str], env: dict) -> tuple[dict, dict]:
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "engine", "analyze", *args]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"analyze failed:\n{proc.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 1024
    return json.loads(proc.stdout), {"wall_s": wall, "peak_rss_mib": rss}


def reference(base_dir: Path, ft_dir: Path) -> dict[str, dict]:
    """Independent float64 metrics of every tensor (numpy; nothing from engine/)."""
    from safetensors.torch import load_file

    def load(folder: Path) -> dict[str, torch.Tensor]:
        out = {}
        for shard in sorted(folder.glob("*.safetensors")):
            out.update(load_file(str(shard)))
        return out

    base, ft = load(base_dir), load(ft_dir)
    ref = {}
    for name in sorted(base):
        d = ft[name].to(torch.float64).numpy() - base[name].to(torch.float64).numpy()
        entry = {"fro_norm": float(np.linalg.norm(d))}
        if d.ndim == 2:
            s = np.linalg.svd(d, compute_uv=False)
            p = s[s > 0] / s.sum()
            energy = np.cumsum(s ** 2) / np.sum(s ** 2)
            entry.update({
                "top": s[:TOP_K].tolist(),
                "effective_rank": float(np.exp(-(p * np.log(p)).sum())),
                "stable_rank": float(np.sum(s ** 2) / s[0] ** 2),
                **{f"energy_k_{lv}": int(np.argmax(energy >= lv / 100 - 1e-12)) + 1 for lv in (50, 90, 99)},
            })
        ref[name] = entry
        del d
    return ref


class RssWatch:
    """Peak anonymous and file-backed resident memory of this process (MiB), sampled."""

    def __init__(self):
        import threading

        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            with open("/proc/self/status") as status:
                for line in status:
                    key = line.split(":")[0]
                    if key in self.peak:
                        self.peak[key] = max(self.peak[key], int(line.split()[1]) // 1024)
            time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def cached_reference(base_dir: Path, ft_dir: Path) -> tuple[dict, float]:
    """The reference, recomputed only when the model files changed (it is the slow part)."""
    from engine.io import ModelFolder

    with ModelFolder(base_dir) as b, ModelFolder(ft_dir) as f:
        prints = [b.file_fingerprints(), f.file_fingerprints()]
    path = WORK / "reference.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("fingerprints") == prints:
            return saved["reference"], saved["seconds"]
    t0 = time.perf_counter()
    ref = reference(base_dir, ft_dir)
    seconds = time.perf_counter() - t0
    path.write_text(json.dumps({"fingerprints": prints, "reference": ref, "seconds": seconds}))
    return ref, seconds


def compare(result: dict, ref: dict) -> dict:
    fro, top, top1, er, sr, ek = [], [], [], [], [], []
    for t in result["tensors"]:
        r = ref[t["name"]]
        fro.append(abs(t["fro_norm"] - r["fro_norm"]) / r["fro_norm"])
        if t["top_singular_values"] is None:
            continue
        got, want = np.array(t["top_singular_values"]), np.array(r["top"])
        top.append(float(np.max(np.abs(got - want) / want)))
        top1.append(float(np.max(np.abs(got[:DELTA_RANK // 2] - want[:DELTA_RANK // 2]) / want[:DELTA_RANK // 2])))
        er.append(abs(t["effective_rank"] - r["effective_rank"]) / r["effective_rank"])
        sr.append(abs(t["stable_rank"] - r["stable_rank"]) / r["stable_rank"])
        ek.append(max(abs(t[f"energy_k_{lv}"] - r[f"energy_k_{lv}"]) / r[f"energy_k_{lv}"] for lv in (50, 90, 99)))
    stats = lambda xs: {"max": max(xs), "median": float(np.median(xs))}  # noqa: E731
    return {"fro_norm_rel_err": stats(fro), "top_k_rel_err": stats(top), "top_half_rel_err": stats(top1),
            "effective_rank_rel_err": stats(er), "stable_rank_rel_err": stats(sr),
            "energy_k_rel_err": stats(ek), "matrices": len(top), "tensors": len(fro)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch/BLAS threads (all runs)")
    parser.add_argument("--readme", action="store_true", help="write the section of bench/README.md")
    parser.add_argument("--skip-randomized", action="store_true")
    parser.add_argument("--small", action="store_true", help="a small model (smoke test; no README)")
    parser.add_argument("--render", action="store_true",
                        help="rewrite the README section from bench/results/analysis.json; measure nothing")
    args = parser.parse_args(argv)
    if args.render:
        readme_from_saved()
        return 0
    global WORK, OUT
    config = dict(CONFIG)
    if args.small:
        config.update(vocab_size=4000, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4)
        WORK, OUT = WORK / "small", ROOT / "bench" / "out" / "analysis_small.json"  # a smoke test: not a result
        args.readme = False

    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "OPENBLAS_NUM_THREADS": threads, "DELTA_WORKBENCH_CACHE": str(WORK / "metrics.duckdb")}
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = threads
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    t0 = time.perf_counter()
    base_dir, ft_dir = generate(WORK, config)
    gen_s = time.perf_counter() - t0
    from engine.io import ModelFolder
    with ModelFolder(base_dir) as b:
        params = b.num_parameters
    print(f"models ready ({params / 1e6:.1f}M parameters, {gen_s:.0f}s)", file=sys.stderr)

    for stale in WORK.glob("metrics.duckdb*"):
        stale.unlink()
    cli = ["--base", str(base_dir), "--finetuned", str(ft_dir), "--json", "--quiet", "--top-k", str(TOP_K)]
    cold, cold_t = timed_cli(cli, env)
    warm, warm_t = timed_cli(cli, env)
    warm2, warm2_t = timed_cli(cli, env)
    assert warm["cache"]["misses"] == 0 and warm["tensors"] == cold["tensors"]
    print(f"cold {cold_t['wall_s']:.1f}s, cached {warm_t['wall_s']:.2f}s", file=sys.stderr)
    methods = {}
    for t in cold["tensors"]:
        if t["spectrum"]:
            methods[t["spectrum"]] = methods.get(t["spectrum"], 0) + 1

    ref, ref_s = cached_reference(base_dir, ft_dir)
    acc_auto = compare(cold, ref)
    print(f"reference {ref_s:.0f}s; auto: {json.dumps(acc_auto)}", file=sys.stderr)

    from engine.analysis import analyze

    with RssWatch() as rss:
        started = time.perf_counter()
        analyze(base_dir, [ft_dir])  # in process, no cache: memory split by kind
        nocache_s = time.perf_counter() - started
    print(f"in process, no cache: {nocache_s:.1f}s, {rss.peak}", file=sys.stderr)

    randomized = None
    if not args.skip_randomized:
        from engine.analysis import AnalysisParams
        from engine.analysis.spectra import SpectrumParams

        t0 = time.perf_counter()
        res = analyze(base_dir, [ft_dir], AnalysisParams(spectrum=SpectrumParams(top_k=TOP_K, method="randomized")))
        rand_s = time.perf_counter() - t0
        iters = [t["svd_iterations"] for t in res["tensors"] if t["spectrum"] == "randomized"]
        randomized = {"seconds": rand_s, "accuracy": compare(res, ref),
                      "iterations": {"max": max(iters), "median": float(np.median(iters))},
                      "converged": sum(1 for t in res["tensors"]
                                       if t["spectrum"] == "randomized" and t["svd_converged"]),
                      "matrices": len(iters)}
        print(f"randomized {rand_s:.0f}s: {json.dumps(randomized)}", file=sys.stderr)

    results = {
        "parameters": params, "generate_s": gen_s, "threads": args.threads, "cores": os.cpu_count(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}",
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "cold": {**cold_t, "in_process_s": cold["seconds"]},
        "cached": {**warm_t, "in_process_s": warm["seconds"]},
        "cached_again": {**warm2_t, "in_process_s": warm2["seconds"]},
        "in_process_no_cache": {"seconds": nocache_s, "peak_anon_mib": rss.peak["RssAnon"],
                                "peak_file_mib": rss.peak["RssFile"]},
        "speedup_wall": cold_t["wall_s"] / warm_t["wall_s"],
        "speedup_in_process": cold["seconds"] / warm["seconds"],
        "spectrum_methods": methods, "reference_s": ref_s, "auto_accuracy": acc_auto,
        "randomized": randomized,
        "cache_bytes": (WORK / "metrics.duckdb").stat().st_size,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2))
    body = readme_section(results)
    print(body)
    if args.readme:
        write_readme(body)
    return 0


def readme_section(r: dict) -> str:
    a, rnd = r["auto_accuracy"], r["randomized"]
    e = lambda x: f"{x:.1e}"  # noqa: E731
    lines = [
        f"`python bench/analysis_bench.py --threads {r['threads']} --readme` (models generated once under "
        "`bench/work/analysis/`, git-ignored; raw numbers in `bench/results/analysis.json`, `--render` "
        "rewrites this section from them).", "",
        f"A {r['parameters'] / 1e6:.0f}M-parameter bf16 Llama base and one fine-tune (random weights; every "
        f"matrix delta = rank-{DELTA_RANK} part + dense noise, stored in bf16), all metrics of every tensor "
        f"(`--top-k {TOP_K}`, one fine-tune so no pairs). Machine: {r['machine']}, {r['threads']} threads; "
        + shared_note(r), "",
        "| run | wall (process) | in-process | peak RSS |", "|---|---|---|---|",
        f"| cold (empty cache) | {r['cold']['wall_s']:.1f} s | {r['cold']['in_process_s']:.1f} s | "
        f"{r['cold']['peak_rss_mib']:.0f} MiB |",
        f"| cached | {r['cached']['wall_s']:.2f} s | {r['cached']['in_process_s']:.3f} s | "
        f"{r['cached']['peak_rss_mib']:.0f} MiB |",
        f"| cached, again | {r['cached_again']['wall_s']:.2f} s | {r['cached_again']['in_process_s']:.3f} s | "
        f"{r['cached_again']['peak_rss_mib']:.0f} MiB |",
        "",
        f"The same analysis in process (no cache, {r['in_process_no_cache']['seconds']:.1f} s) peaked at "
        f"{r['in_process_no_cache']['peak_anon_mib']} MiB of anonymous memory (torch itself included) and "
        f"{r['in_process_no_cache']['peak_file_mib']} MiB file-backed (pages of memory-mapped files): one "
        "tensor of each model at a time in float32, plus the next one being read; the largest are the "
        "32000 x 1024 embedding and head.", "",
        f"Cached repeat: **{r['speedup_wall']:.0f}x** faster as a whole command (most of what is left is "
        f"Python start-up and importing torch), **{r['speedup_in_process']:.0f}x** inside the process. "
        f"Cache file: {r['cache_bytes'] / 2**20:.1f} MiB. Spectrum methods used (auto): "
        + ", ".join(f"{k} {v}" for k, v in sorted(r["spectrum_methods"].items())) + ".", "",
        f"Accuracy against an independent float64 computation (safetensors -> float64 numpy, "
        f"`np.linalg.svd`; {r['reference_s']:.0f} s), relative errors, max (median) over "
        f"{a['tensors']} tensors / {a['matrices']} matrices:", "",
        "| metric | auto (exact + gram) | all randomized |", "|---|---|---|",
    ]
    def row(label, key):
        ra = a[key]
        rr = rnd["accuracy"][key] if rnd else None
        right = f"{e(rr['max'])} ({e(rr['median'])})" if rr else "-"
        return f"| {label} | {e(ra['max'])} ({e(ra['median'])}) | {right} |"
    lines += [row("Frobenius norm", "fro_norm_rel_err"), row(f"top-{TOP_K} singular values", "top_k_rel_err"),
              row(f"top-{DELTA_RANK // 2} singular values", "top_half_rel_err"),
              row("stable rank", "stable_rank_rel_err"), row("effective rank", "effective_rank_rel_err"),
              row("energy k (50/90/99 %)", "energy_k_rel_err")]
    if rnd:
        lines += ["", f"All-randomized run (q = top-k + 16 oversampling, stop when the top-k Ritz values move "
                  f"< 1e-6 relative, at most 40 iterations): {rnd['seconds']:.0f} s in process, iterations "
                  f"median {rnd['iterations']['median']:.0f} / max {rnd['iterations']['max']}, "
                  f"{rnd['converged']} of {rnd['matrices']} matrices converged. Its top singular values are "
                  "computed; its effective rank and energy k beyond the computed values come from the "
                  "modelled tail (engine/analysis/spectra.py), so their errors are those of the model, "
                  "not of the SVD."]
    return "\n".join(lines) + "\n"


def shared_note(r: dict) -> str:
    """How loaded the cores were: the load average before and after, per core."""
    before, after = r["load_average_before"][0], r["load_average_after"][0]
    cores = r.get("cores") or os.cpu_count()
    text = f"load average {before:.1f} before, {after:.1f} after on {cores} cores"
    # the run itself adds up to ``threads`` to the load average after it
    if before > 0.5 * cores:
        return f"**shared with other jobs** during the run ({text}), so wall times are pessimistic."
    return f"no other work running ({text}; the run's own threads count in the second)."


def write_readme(body: str) -> None:
    write_readme_section(SECTION, body)


def readme_from_saved() -> None:
    """Rewrite the README section from bench/results/analysis.json (no new measurement)."""
    write_readme(readme_section(json.loads(OUT.read_text())))


if __name__ == "__main__":
    sys.exit(main())
