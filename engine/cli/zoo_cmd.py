"""``python -m engine zoo build|list``: train the demo zoo, or list one."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time


def register(subparsers) -> None:
    parser = subparsers.add_parser("zoo", help="build or list the demo model zoo")
    sub = parser.add_subparsers(dest="zoo_command", required=True)

    build = sub.add_parser("build", help="train the zoo offline on CPU")
    build.add_argument("--out", default=None,
                       help="destination folder (default: $DELTA_WORKBENCH_ZOO or "
                            "~/.cache/delta_workbench/zoo); must not exist or be empty. Each "
                            "family appears there as soon as it is trained")
    build.add_argument("--quick", action="store_true", help="small and fast (for tests)")
    build.add_argument("--resume", action="store_true",
                       help="continue an interrupted build of --out, keeping the families it "
                            "published and the models it finished")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (default: torch's choice)")
    build.set_defaults(func=run_build, keep_staging_for=_resumed_destination)

    listing = sub.add_parser("list", help="list the models of a zoo")
    listing.add_argument("dir", nargs="?", default=None, help="zoo folder (default: the default zoo)")
    listing.add_argument("--json", action="store_true", help="print the manifest as JSON")
    listing.set_defaults(func=run_list)


def _resumed_destination(args: argparse.Namespace) -> list:
    """A resumed build adopts its interrupted staging folder: the start-up sweep keeps it."""
    from engine.zoo import default_zoo_dir

    return [args.out or default_zoo_dir()] if args.resume else []


def run_build(args: argparse.Namespace) -> int:
    import torch

    from engine.zoo import build_zoo, default_zoo_dir

    def terminate(signum, frame):  # a plain kill removes the staging folder like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    out = args.out or default_zoo_dir()
    last = [0.0]

    def progress(fraction: float, message: str) -> None:
        now = time.time()
        if now - last[0] >= 2.0 or fraction >= 1.0 or not message.startswith("training"):
            last[0] = now
            print(f"[{fraction * 100:5.1f}%] {message}", file=sys.stderr, flush=True)

    started = time.time()
    path = build_zoo(out, quick=args.quick, seed=args.seed, progress=progress,
                      resume=args.resume)
    print(f"zoo built in {time.time() - started:.1f} s: {path}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    from engine.text import printable
    from engine.zoo import default_zoo_dir, load_manifest, zoo_complete

    manifest = load_manifest(args.dir or default_zoo_dir())
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    tasks = list(manifest.get("tasks", {}))
    header = f"{'path':<18} {'family':<7} {'role':<9} {'task':<10} " + " ".join(
        f"{t[:7]:>7}" for t in tasks)
    print(header)
    for entry in manifest["models"]:
        accuracy = entry.get("accuracy", {})
        cells = " ".join(f"{accuracy[t]:7.2f}" if t in accuracy else f"{'-':>7}" for t in tasks)
        print(f"{entry['path']:<18} {entry['family']:<7} {entry['role']:<9} "
              f"{str(entry.get('task')):<10} {cells}")
    if not zoo_complete(manifest):
        pending = manifest.get("pending", [])
        print(f"still training ({len(pending)}): {', '.join(printable(p) for p in pending)}")
    return 0
