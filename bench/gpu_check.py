"""The GPU check: every tensor path on CUDA against the same path on the CPU, and merge times.

Run on a machine with a CUDA device (``bench/gpu_check.sh`` is the one command to run there);
``--devices cpu,cpu`` runs the same comparisons on a CPU-only machine, which is how the script
itself is tested.

1. Merge: every registered merge method, ``python -m engine merge --device D`` on the quick
   zoo's small family, every output tensor compared. Randomized methods (DARE, DELLA, ...) draw
   their masks from a seeded generator on the compute device, and CPU and CUDA generators give
   different streams, so for them only the shapes and the kept share are compared; the row says
   so.
2. Compression: every compressor, ``compress`` and ``decompress`` on each device at 8x, the
   rebuilt tensors compared, and the artifact's bytes on disk.
3. Analysis: ``analyze --json --no-cache --device D``, every per-tensor metric compared.
4. Speed (``--speed``): the ~270M-parameter bf16 Llama triple of ``bench/merge_speed.py``,
   task_arithmetic / ties / linear / slerp with ``--device cpu`` and ``--device cuda``, and
   ``mergekit-yaml --cuda`` when ``--mergekit`` names one.

Tolerance: relative Frobenius error 1e-4 per tensor (fp32 arithmetic in a different order; TF32
is off in the engine's kernels unless a method says otherwise). Results: ``--out FILE.json``;
exit status 1 when a deterministic comparison is over the tolerance.

    python bench/gpu_check.py --out gpu_check.json [--zoo ZOO] [--speed] [--mergekit EXE]
    python bench/gpu_check.py --devices cpu,cpu --out /tmp/self.json   # the script's own test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from bench._common import typical_merge_settings  # noqa: E402

TOLERANCE = 1e-4
SPEED_METHODS = ("task_arithmetic", "ties", "linear", "slerp")


def engine(args: list[str], env: dict) -> tuple[float, float, str]:
    """Run ``python -m engine ARGS``: (wall s, peak RSS MiB of the children so far, stdout)."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "engine", *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"engine {args[0]} failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    return wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, proc.stdout


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    """Worst relative Frobenius error over the tensors both have; names only one has."""
    worst, where = 0.0, None
    for name in sorted(set(a) & set(b)):
        x, y = a[name].double(), b[name].double()
        if x.shape != y.shape:
            return {"max_rel_err": float("inf"), "tensor": name, "why": f"shapes {tuple(x.shape)} vs {tuple(y.shape)}"}
        err = float((x - y).norm() / max(float(y.norm()), 1e-30))
        if err > worst:
            worst, where = err, name
    return {"max_rel_err": worst, "tensor": where, "only_one": sorted(set(a) ^ set(b))}


def kept_share(merged: dict, base: dict) -> float:
    changed = sum(int((merged[n].double() != base[n].double()).sum()) for n in merged if n in base)
    return changed / max(1, sum(merged[n].numel() for n in merged if n in base))


def check_merges(zoo: dict, devices: list[str], work: Path, env: dict, only: list[str] | None) -> list[dict]:
    from engine.merge import list_methods
    from engine.merge.registry import get_method

    rows = []
    base_tensors = read_tensors(Path(zoo["base"]))
    for name in only or list_methods():
        method = get_method(name)
        used, per_model, params = typical_merge_settings(name, len(zoo["finetunes"]))
        recipe = {"merge_method": name, "dtype": "float32",
                  "models": [{"model": str(f), "parameters": p} for f, p in zip(zoo["finetunes"][:used], per_model)]}
        if method.requires_base or method.optional_base:
            recipe["base_model"] = str(zoo["base"])
        if params:
            recipe["parameters"] = params
        path = work / f"{name}.yml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        outs, walls = [], []
        try:
            for i, device in enumerate(devices):
                out = work / f"merge_{name}_{i}"
                shutil.rmtree(out, ignore_errors=True)
                wall, _, _ = engine(["merge", str(path), "--out", str(out), "--device", device, "--quiet"], env)
                walls.append(wall)
                outs.append(read_tensors(out))
        except RuntimeError as err:
            rows.append({"path": "merge", "method": name, "ok": False, "error": str(err)})
            continue
        row = {"path": "merge", "method": name, "randomized": method.randomized,
               "wall_s": dict(zip([f"{d}#{i}" for i, d in enumerate(devices)], walls)),
               **compare(outs[1], outs[0])}
        if method.randomized and devices[0] != devices[1]:
            shares = [kept_share(o, base_tensors) for o in outs]
            row.update(kept_share=shares, ok=abs(shares[0] - shares[1]) < 0.02 and not row["only_one"],
                       note="masks drawn on each device's generator: kept shares compared, not values")
        else:
            row["ok"] = row["max_rel_err"] <= TOLERANCE and not row["only_one"]
        rows.append(row)
        print(f"merge {name:18s} {'ok ' if row['ok'] else 'BAD'} max rel err {row['max_rel_err']:.2e}", flush=True)
    return rows


def check_compression(zoo: dict, devices: list[str], work: Path, env: dict) -> list[dict]:
    from engine.compress.registry import list_methods

    rows = []
    ft = zoo["finetunes"][0]
    for name in list_methods():
        rebuilt, sizes = [], []
        try:
            for i, device in enumerate(devices):
                art, out = work / f"art_{name}_{i}", work / f"rebuilt_{name}_{i}"
                for p in (art, out):
                    shutil.rmtree(p, ignore_errors=True)
                engine(["compress", "--base", str(zoo["base"]), "--finetuned", str(ft), "--method", name,
                        "--ratio", "8", "--out", str(art), "--device", device, "--quiet"], env)
                engine(["decompress", str(art), "--base", str(zoo["base"]), "--out", str(out),
                        "--device", device, "--quiet"], env)
                sizes.append(sum(p.stat().st_size for p in art.rglob("*") if p.is_file()))
                rebuilt.append(read_tensors(out))
        except RuntimeError as err:
            rows.append({"path": "compress", "method": name, "ok": False, "error": str(err)})
            continue
        row = {"path": "compress", "method": name, "artifact_bytes": sizes, **compare(rebuilt[1], rebuilt[0])}
        # learned codecs (BitDelta's distillation, DBMS) and quantizer ties may round a few codes
        # differently across devices; the rebuilt model must still agree closely
        row["ok"] = row["max_rel_err"] <= (1e-2 if name in ("bitdelta", "dbms") else TOLERANCE) and not row["only_one"]
        rows.append(row)
        print(f"compress {name:12s} {'ok ' if row['ok'] else 'BAD'} max rel err {row['max_rel_err']:.2e}", flush=True)
    return rows


def check_analysis(zoo: dict, devices: list[str], env: dict) -> list[dict]:
    results = []
    for device in devices:
        _, _, out = engine(["analyze", "--base", str(zoo["base"]), *sum((["--finetuned", str(f)] for f in zoo["finetunes"][:2]), []),
                            "--json", "--no-cache", "--device", device, "--quiet"], env)
        results.append(json.loads(out))
    worst, where = 0.0, None
    for ta, tb in zip(results[0]["tensors"], results[1]["tensors"]):
        for key, va in ta.items():
            vb = tb.get(key)
            values = [(va, vb)] if isinstance(va, (int, float)) and not isinstance(va, bool) else (
                list(zip(va, vb)) if isinstance(va, list) and va and isinstance(va[0], (int, float)) else [])
            for x, y in values:
                err = abs(x - y) / max(abs(x), 1e-12)
                if err > worst:
                    worst, where = err, f"{ta.get('name')}:{key}"
    row = {"path": "analyze", "max_rel_err": worst, "where": where, "ok": worst <= 1e-3,
           "tensors": len(results[0]["tensors"])}
    print(f"analyze {'ok ' if row['ok'] else 'BAD'} max rel err {worst:.2e} ({where})", flush=True)
    return [row]


def speed(devices: list[str], mergekit: str | None, work: Path, env: dict) -> list[dict]:
    from bench import merge_speed

    folders = merge_speed.generate(work / "speed")
    rows = []
    for method in SPEED_METHODS:
        path = work / f"speed_{method}.yml"
        path.write_text(yaml.safe_dump(merge_speed.recipe(method, folders, "float32"), sort_keys=False))
        for device in dict.fromkeys(devices):
            out = work / f"speed_{method}_{device}"
            shutil.rmtree(out, ignore_errors=True)
            wall, rss, _ = engine(["merge", str(path), "--out", str(out), "--device", device, "--quiet"], env)
            rows.append({"path": "speed", "tool": "ours", "method": method, "device": device, "wall_s": wall})
            shutil.rmtree(out, ignore_errors=True)
        if mergekit:
            out = work / f"speed_{method}_mergekit"
            started = time.perf_counter()
            proc = subprocess.run([mergekit, str(path), str(out), "--cuda", "--quiet"], capture_output=True, text=True)
            rows.append({"path": "speed", "tool": "mergekit", "method": method, "device": "cuda",
                         "wall_s": time.perf_counter() - started, "ok": proc.returncode == 0})
            shutil.rmtree(out, ignore_errors=True)
        print(f"speed {method}: " + ", ".join(f"{r['tool']}/{r['device']} {r['wall_s']:.2f}s"
                                             for r in rows if r["method"] == method), flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="results file (JSON)")
    parser.add_argument("--zoo", help="a built quick zoo (default: build one in the work folder)")
    parser.add_argument("--devices", default="cpu,cuda", help="the reference device, then the one checked")
    parser.add_argument("--methods", nargs="*", help="merge methods to check (default: all)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["merge", "compress", "analyze"])
    parser.add_argument("--speed", action="store_true", help="also time the 270M triple's merges")
    parser.add_argument("--mergekit", help="mergekit-yaml to time with --cuda (speed only)")
    parser.add_argument("--work", help="work folder (default: a temporary one, removed at the end)")
    args = parser.parse_args(argv)
    devices = args.devices.split(",")
    if len(devices) != 2:
        parser.error("--devices takes two devices: reference,checked")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "DELTA_WORKBENCH_HOME": str(work / "home")}
    try:
        zoo_dir = Path(args.zoo) if args.zoo else work / "zoo"
        if not (zoo_dir / "zoo.json").is_file():
            engine(["zoo", "build", "--quick", "--out", str(zoo_dir), "--seed", "0"], env)
        manifest = json.loads((zoo_dir / "zoo.json").read_text())
        small = [m for m in manifest["models"] if m["family"] == "small"]
        zoo = {"base": zoo_dir / next(m["path"] for m in small if m["role"] == "base"),
               "finetunes": [zoo_dir / m["path"] for m in small if m["role"] == "finetune"]}
        rows = []
        if "merge" not in args.skip:
            rows += check_merges(zoo, devices, work, env, args.methods)
        if "compress" not in args.skip:
            rows += check_compression(zoo, devices, work, env)
        if "analyze" not in args.skip:
            rows += check_analysis(zoo, devices, env)
        if args.speed:
            rows += speed(devices, args.mergekit, work, env)
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        record = {"devices": devices, "gpu": gpu, "torch": torch.__version__, "python": platform.python_version(),
                  "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d", time.gmtime()),
                  "tolerance": TOLERANCE, "rows": rows}
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
        bad = [r for r in rows if r.get("ok") is False]
        print(f"{len(rows) - len(bad)} of {len(rows)} checks ok; results in {args.out}")
        return 1 if bad else 0
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
