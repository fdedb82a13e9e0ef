"""``python -m engine methods [merge|compress|repair] [NAME] [--json]``: the methods of the
registries, their papers, parameters (type, default, range, meaning) and, for compressors, the
named presets the bench measured. The same schemas the app's forms are rendered from."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    parser = subparsers.add_parser("methods", help="list merge methods and compressors with their parameters")
    parser.add_argument("kind", nargs="?", choices=["merge", "compress", "repair"], default=None,
                        help="one registry (default: all)")
    parser.add_argument("name", nargs="?", default=None, help="one method: its parameters in full")
    parser.add_argument("--json", action="store_true", help="print the descriptions as JSON")
    parser.set_defaults(func=run)


def _registry(kind: str):
    """The package whose get_method/list_methods serve ``kind``."""
    import importlib

    return importlib.import_module({"merge": "engine.merge", "compress": "engine.compress",
                                    "repair": "engine.repair.registry"}[kind])


def _describe(kind: str, name: str) -> dict:
    return {"kind": kind, **_registry(kind).get_method(name).describe()}


def _param_lines(schema: dict) -> list[str]:
    lines = []
    for field, spec in schema.get("properties", {}).items():
        kind = spec.get("type") or "/".join(o.get("type", "?") for o in spec.get("anyOf", []))
        if "enum" in spec:
            kind = "|".join(map(str, spec["enum"]))
        bounds = [f"{op} {spec[key]}" for key, op in (("minimum", ">="), ("exclusiveMinimum", ">"),
                                                       ("maximum", "<="), ("exclusiveMaximum", "<"))
                  if key in spec]
        default = f" = {json.dumps(spec['default'])}" if "default" in spec else ""
        extra = f" ({', '.join(bounds)})" if bounds else ""
        lines.append(f"    {field}: {kind}{default}{extra}  {spec.get('description', '')}".rstrip())
    return lines


def run(args: argparse.Namespace) -> int:
    from engine.errors import ParameterError

    kinds = [args.kind] if args.kind else ["merge", "compress", "repair"]
    if args.name is not None:
        if args.kind is None:
            raise ParameterError("give the registry too: methods merge|compress|repair NAME")
        described = [_describe(args.kind, args.name)]
    else:
        described = [_describe(kind, name) for kind in kinds for name in _registry(kind).list_methods()]
    if args.json:
        print(json.dumps(described))
        return 0
    for d in described:
        print(f"{d['kind']} {d['name']}: {d['paper']}")
        if args.name is None:
            continue
        print("  parameters:")
        print("\n".join(_param_lines(d["params_schema"])) or "    (none)")
        if d.get("model_params_schema", {}).get("properties"):
            print("  per-model parameters:")
            print("\n".join(_param_lines(d["model_params_schema"])))
        if d.get("solved_by_ratio"):
            print(f"  solved by --ratio: {', '.join(d['solved_by_ratio'])}")
        for preset, values in (d.get("presets") or {}).items():
            print(f"  preset {preset}: {json.dumps(values)}")
    return 0
