"""A newcomer's first minutes: how long after ``python -m engine zoo build`` starts the first
family (the small one) is published, i.e. the app's pages have models to show.

Runs the build as a separate command (as the app's job or a user would), watches ``OUT/zoo.json``
and records the wall time from the command's start until the manifest first appears (the
small family published), until each later family appears, and until it says complete. The
build's own ``published_after_seconds`` (from the start of training, imports excluded) is kept
beside it.

    python bench/zoo_first_family.py --out ZOO [--quick] [--readme]

``OUT`` must not exist or be empty; the zoo is left there (a full zoo, usable by the other
benchmarks). Raw numbers: ``bench/results/zoo_first_family.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import write_readme_section  # noqa: E402

RESULT = ROOT / "bench" / "results" / "zoo_first_family.json"
ZOO_FULL = ROOT / "bench" / "results" / "zoo_full.json"  # the record of an idle full build


def _manifest(out: Path) -> dict | None:
    try:
        return json.loads((out / "zoo.json").read_text())
    except (OSError, ValueError):
        return None  # not there yet (it appears by one rename, never torn)


def _load_note(result: dict) -> str:
    per_core = result["cpu_count"] or 1
    if result["load_average_before"] / per_core < 0.5 <= result["load_average_after"] / per_core:
        return ("the machine was idle when the build started; other work shared the cores later, "
                "so the later families' times are pessimistic")
    if result["load_average_before"] / per_core >= 0.5:
        return "other work shared the cores, so the times are pessimistic"
    return "an idle machine"


def write_readme(result: dict) -> None:
    seen, first = result["families_seconds"], result["first_family"]
    families = ", ".join(f"{name} {s:.0f} s" for name, s in seen.items())
    write_readme_section("## Zoo build: time to the first family", (
        f"`python bench/zoo_first_family.py --out ZOO --readme` runs `{result['command']}` and "
        "watches `ZOO/zoo.json`. The zoo is published one family at a time, the small family "
        f"first, so the pages have models to show after **{seen[first]:.0f} s** ({first}: "
        f"{result['first_family_models']} models) instead of at the end of the build "
        f"({result['complete_seconds']:.0f} s; the first family came at "
        f"{seen[first] / result['complete_seconds']:.0%} of it). Families visible after: "
        f"{families}. Machine: "
        f"{result['cpu_count']} cores, {result['torch_threads']} torch threads, torch "
        f"{result['torch_version']}, OMP_WAIT_POLICY={result['omp_wait_policy']} (as the app's "
        f"job workers run); load average {result['load_average_before']} before, "
        f"{result['load_average_after']} after ({_load_note(result)}). For scale, the idle build recorded in `bench/results/zoo_full.json` "
        f"trained the small family in {_idle_small_seconds():.0f} s of its "
        f"{json.loads(ZOO_FULL.read_text())['build_seconds']:.0f} s. Raw numbers: "
        "`bench/results/zoo_first_family.json`."))


def _idle_small_seconds() -> float:
    record = json.loads(ZOO_FULL.read_text())
    return sum(m["train_seconds"] for m in record["models"] if m["family"] == "small")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="zoo destination (must not exist or be empty)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--readme", action="store_true", help="write the bench/README.md section")
    parser.add_argument("--readme-from-result", action="store_true",
                        help="only rewrite the README section from the recorded result")
    args = parser.parse_args(argv)
    if args.readme_from_result:
        write_readme(json.loads(RESULT.read_text()))
        return 0
    if not args.out:
        parser.error("--out is required")
    out = Path(args.out).absolute()
    command = [sys.executable, "-m", "engine", "zoo", "build", "--out", str(out)]
    if args.quick:
        command.append("--quick")
    load_before = os.getloadavg()[0]
    log = out.parent / f"{out.name}.build.log"
    seen: dict[str, float] = {}
    started = time.monotonic()
    with open(log, "w") as handle:
        # passive OpenMP waiting, as the app gives its job workers (app.py): on cores shared
        # with other work, spin-waiting threads made the build 10-25x slower here
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        child = subprocess.Popen(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                 env=env)
        while True:
            manifest = _manifest(out)
            now = round(time.monotonic() - started, 1)
            if manifest is not None:
                for family in dict.fromkeys(m["family"] for m in manifest["models"]):
                    if family not in seen:
                        seen[family] = now
                        print(f"{now:7.1f} s: {family} published", flush=True)
            if child.poll() is not None:
                break
            time.sleep(0.5)
    total = round(time.monotonic() - started, 1)
    if child.returncode != 0:
        print(f"zoo build failed (exit {child.returncode}); see {log}", file=sys.stderr)
        return 1
    manifest = _manifest(out) or {}
    first = next(iter(seen))
    result = {
        "command": " ".join(["python", "-m", "engine", "zoo", "build", "--out", "ZOO"]
                            + (["--quick"] if args.quick else [])),
        "first_family": first,
        "first_family_models": sum(m["family"] == first for m in manifest.get("models", [])),
        "first_family_seconds": seen[first],
        "families_seconds": seen,
        "complete_seconds": total,
        "build_published_after_seconds": manifest.get("published_after_seconds"),
        "build_seconds": manifest.get("build_seconds"),
        "complete": manifest.get("complete"),
        "torch_threads": manifest.get("torch_threads"),
        "omp_wait_policy": env["OMP_WAIT_POLICY"],
        "torch_version": manifest.get("torch_version"),
        "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "load_average_before": round(load_before, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if args.readme:
        write_readme(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
