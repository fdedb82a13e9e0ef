"""``python -m engine analyze --base B --finetuned F [--finetuned F2 ...] [--json]``: delta metrics.

Per tensor and fine-tune: norms, top singular values, effective/stable rank, energy, sparsity,
kurtosis, NaN/Inf counts; per tensor and pair of fine-tunes: cosine, sign conflicts, top-k
overlap, subspace angles; a task x task cosine matrix. Results are cached in the DuckDB metric
store (``DELTA_WORKBENCH_CACHE`` or ``--cache``); ``--no-cache`` recomputes and writes nothing.
Model folders are opened the way ``inspect`` and ``eval`` open them (validated safetensors
folders; bad input is one line on stderr, exit 2). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager

from engine.text import printable


def register(subparsers) -> None:
    parser = subparsers.add_parser("analyze", help="delta metrics of fine-tunes against a base")
    parser.add_argument("--base", required=True, help="base model folder")
    parser.add_argument("--finetuned", action="append", required=True,
                        help="fine-tuned model folder (repeat for several)")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    parser.add_argument("--no-cache", action="store_true", help="recompute; do not read or write the cache")
    parser.add_argument("--cache", default=None, help="metric cache file (default: $DELTA_WORKBENCH_CACHE "
                        "or the workbench home)")
    parser.add_argument("--top-k", type=int, default=None, help="top singular values per tensor (default 16)")
    parser.add_argument("--spectrum", choices=["auto", "exact", "gram", "randomized"], default=None,
                        help="how spectra are computed (default auto)")
    parser.add_argument("--density", type=float, default=None,
                        help="top-k fraction for sign conflicts and overlap (default 0.2)")
    parser.add_argument("--subspace-rank", type=int, default=None,
                        help="rank of the subspaces compared by principal angles (default 8)")
    parser.add_argument("--no-pairs", action="store_true", help="skip pairwise metrics")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def validated(params_class, **given):
    """``params_class(**given)`` with the options left unset (None) dropped; a validation error
    becomes a one-line ParameterError naming the option."""
    from pydantic import ValidationError

    from engine.errors import ParameterError

    try:
        return params_class(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise ParameterError(f"invalid option {where}: {first.get('msg')}") from None


@contextmanager
def metric_store(args: argparse.Namespace):
    """The DuckDB metric store of ``--cache`` (None with ``--no-cache``), closed on exit."""
    if args.no_cache:
        yield None
        return
    from cache import MetricStore

    store = MetricStore(args.cache)
    try:
        yield store
    finally:
        store.close()


def build_params(args: argparse.Namespace):
    from engine.analysis import AnalysisParams

    spectrum = {k: v for k, v in {"top_k": args.top_k, "method": args.spectrum}.items() if v is not None}
    pairs = {k: v for k, v in {"density": args.density, "subspace_rank": args.subspace_rank}.items()
             if v is not None}
    return validated(AnalysisParams, spectrum=spectrum, pairs=pairs)


class ProgressBar:
    """tqdm on stderr when installed, else a plain counter line."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None

    def __call__(self, done: int, total: int, name: str) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="tensor", file=sys.stderr, dynamic_ncols=True,
                                desc="analyze")
            except ImportError:
                self.bar = False
        if self.bar:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix_str(printable(name)[-48:], refresh=False)
        else:
            print(f"\r[{done:>5}/{total}] {printable(name)[-60:]:<60}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        elif self.bar is False:
            print(file=sys.stderr)


def fmt_value(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def run(args: argparse.Namespace) -> int:
    from engine.analysis import analyze
    from engine.device import resolve_device

    params = build_params(args)
    device = resolve_device(args.device)
    progress = ProgressBar(not args.quiet)
    with metric_store(args) as store:
        try:
            result = analyze(args.base, args.finetuned, params, cache=store, progress=progress,
                             device=device, with_pairs=not args.no_pairs)
        finally:
            progress.close()
    for warning in result["warnings"]:
        print(f"warning: {printable(warning)}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, allow_nan=False))
        return 0
    names = result["finetuned"]
    width = max((len(printable(t["name"])) for t in result["tensors"]), default=4)
    print(f"base: {printable(result['base'])}")
    for i, name in enumerate(names):
        print(f"[{i}] {printable(name)}")
    print(f"{'tensor':<{width}}  {'m':>2} {'fro_norm':>10} {'rel_norm':>10} {'s1':>10} "
          f"{'eff_rank':>9} {'stable':>8} {'k90':>6} {'sparsity':>8}")
    for t in result["tensors"]:
        s1 = t["top_singular_values"][0] if t.get("top_singular_values") else None
        print(f"{printable(t['name']):<{width}}  {t['model']:>2} {fmt_value(t['fro_norm']):>10} {fmt_value(t['rel_norm']):>10} "
              f"{fmt_value(s1):>10} {fmt_value(t['effective_rank']):>9} {fmt_value(t['stable_rank']):>8} "
              f"{fmt_value(t['energy_k_90']):>6} {fmt_value(t['sparsity'], 3):>8}")
    cos = result["models"]["cosine"]
    if len(names) > 1:
        print("task vector cosine:")
        for i, row in enumerate(cos):
            print(f"  [{i}] " + " ".join(f"{fmt_value(v, 3):>7}" for v in row))
    c = result["cache"]
    print(f"cache: {c['status']} ({c['hits']} hits, {c['misses']} computed) in {result['seconds']:.2f}s")
    return 0
