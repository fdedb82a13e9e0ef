"""``python -m engine compress --base B --finetuned F --method M --ratio R --out ART``.

Writes a compressed-delta artifact (see ``engine.compress.artifact``) atomically. Method
parameters: ``--preset NAME`` (a parameter set the bench measured) and/or ``--param key=value`` (repeatable; values are YAML scalars, lists or mappings;
``a.b=v`` sets a nested key, e.g. ``--param inner=impart --param inner_params.C=1``).
``--calibration FILE.jsonl``: the methods that learn scalars (bitdelta with distill, dbms)
calibrate on the dev split of the user's file instead of the zoo's text or task (their
``calibration_data`` parameter). ``--scope blocks`` compresses only the transformer blocks'
matrices and stores the rest exactly in fp16 (the papers' setting); ``--ratio-over
compressed`` aims ``--ratio`` at the compressed matrices' sections instead of the whole
folder (``engine.compress.scope``; both ratios are printed). Both are the methods' ``scope``
and ``ratio_over`` parameters.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from engine.errors import ParameterError
from engine.text import printable
from engine.cli.progress import stderr_progress


def register(subparsers) -> None:
    parser = subparsers.add_parser("compress", help="compress a fine-tune's delta into an artifact")
    parser.add_argument("--base", required=True, help="base model folder")
    parser.add_argument("--finetuned", required=True, help="fine-tuned model folder (same layout)")
    parser.add_argument("--method", required=True, help="compressor (magnitude, dare, svd, bitdelta, "
                                                       "delta_come, impart, delta_dct, dbms)")
    parser.add_argument("--ratio", type=float, default=None,
                        help="target ratio: 2 bytes x delta entries / bytes of the artifact folder")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="method parameter (repeatable)")
    parser.add_argument("--preset", default=None,
                        help="a named parameter set of the method (e.g. small-models; see "
                             "bench/README.md); --param values override it")
    parser.add_argument("--calibration", default=None, metavar="FILE.jsonl",
                        help="calibrate on the dev split of this JSONL file of {prompt, answer} "
                             "lines (bitdelta's distillation, dbms)")
    parser.add_argument("--scope", choices=("all", "blocks"), default=None,
                        help="what is compressed: every matrix (all, the default) or only the "
                             "transformer blocks' (blocks; the rest stored in fp16, counted on disk)")
    parser.add_argument("--ratio-over", choices=("artifact", "compressed"), default=None,
                        help="what --ratio is measured over: the whole artifact folder (default) "
                             "or the compressed matrices' sections (the papers' convention)")
    parser.add_argument("--out", required=True, help="artifact folder (must not exist or be empty)")
    parser.add_argument("--side-files", choices=("dedup", "embed"), default="dedup",
                        help="config/tokenizer files identical to the base's: reference (dedup) or store")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.set_defaults(func=run)


def parse_params(items: list[str]) -> dict:
    from engine.textparse import parse_yaml

    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ParameterError(f"--param {item!r}: expected KEY=VALUE")
        # the recipes' strict loader: a value is YAML too, and can be an alias bomb as well
        value = parse_yaml(raw, source=f"--param {key}", error=ParameterError) if raw.strip() else ""
        target = out
        parts = key.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ParameterError(f"--param {key}: {part} is not a mapping")
        target[parts[-1]] = value
    return out


def run(args) -> int:
    from engine.compress import compress, get_method

    params = parse_params(args.param)
    if args.preset:
        params = {**get_method(args.method).preset(args.preset), **params}
    if args.calibration is not None:
        if "calibration_data" not in get_method(args.method).params_class.model_fields:
            raise ParameterError(f"--calibration: {args.method} learns nothing on calibration "
                                 "data (bitdelta with distill and dbms do)")
        if "calibration_data" in params:
            raise ParameterError("give --calibration or --param calibration_data, not both")
        # absolute: the artifact's manifest records the file it was calibrated on
        params["calibration_data"] = str(Path(args.calibration).absolute())
    for key, value in (("scope", args.scope), ("ratio_over", args.ratio_over)):
        if value is not None:
            if key in params:
                raise ParameterError(f"give --{key.replace('_', '-')} or --param {key}, not both")
            params[key] = value

    progress = stderr_progress(args.quiet)

    result = compress(args.base, args.finetuned, args.out, args.method, ratio=args.ratio,
                      params=params, device=args.device, side_files=args.side_files,
                      progress=progress)
    if not args.quiet:
        print(file=sys.stderr)
    for warning in result.warnings:
        print(f"warning: {printable(warning)}", file=sys.stderr)
    summary = {"out": str(result.out), "method": result.method, "params": result.params,
               "target_ratio": result.target_ratio, "ratio": round(result.ratio, 4),
               "bytes": result.bytes, "delta_entries": result.delta_entries,
               "seconds": round(result.seconds, 3), "device": result.device,
               "scope": result.scope, "compressed_entries": result.compressed_entries,
               "ratio_compressed": (None if result.ratio_compressed is None
                                    else round(result.ratio_compressed, 4)),
               "calibration": result.calibration}
    print(json.dumps(summary) if args.json else
          f"compressed {result.delta_entries} delta entries with {result.method} into {result.out}: "
          f"{result.bytes} bytes, ratio {result.ratio:.2f}"
          + (f" (target {result.target_ratio:g})" if result.target_ratio else "")
          + ("" if result.ratio_compressed is None else
             f", ratio over the compressed set ({result.scope}) {result.ratio_compressed:.2f}")
          + f", {result.seconds:.1f}s on {result.device}")
    return 0
