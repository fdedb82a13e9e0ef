"""Side-by-side parity with mergekit-moe: the same MoE configs through mergekit 0.1.5's
`mergekit-moe` (its own venv, CPU) and `engine.moe.run_moe`, every output tensor compared.

Families: tiny fp32 Llama (untied, tied), Mistral and Qwen2 (q/k/v biases, tied) models built
offline (a base and three fine-tunes: base + small random deltas, written by transformers'
save_pretrained, with the zoo's character tokenizer), and the zoo's small family (its base and
four task fine-tunes). Gates: `cheap_embed` and `hidden` (deterministic, so the routers are
compared like every other tensor; mergekit's random gates are unseeded). Qwen2 goes into a
Qwen MoE output with one shared expert. mergekit's per-expert Qwen MoE names are mapped onto
transformers 5's fused layout (ours) before comparing; the relative difference of a tensor is
|ours - mergekit| / |mergekit| (Frobenius). Every output, ours and mergekit's, is loaded with
AutoModelForCausalLM and run once.

    python bench/moe_parity.py --mergekit VENV/bin/mergekit-moe [--zoo ZOO] [--readme]
    python bench/moe_parity.py --render     # README section from bench/results/moe_parity.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._common import RESULTS, machine_conditions, write_readme_section  # noqa: E402

SECTION = "## mergekit-moe parity"
OUT = RESULTS / "moe_parity.json"
TOLERANCE = 1e-4


def cases(root: Path, zoo: Path | None) -> list[dict]:
    from tests.moe.builders import build_family, moe_config

    fams = {"llama": build_family(root / "llama"), "llama (tied)": build_family(root / "tied", tie=True),
            "mistral": build_family(root / "mistral", kind="mistral"),
            "qwen2 (tied)": build_family(root / "qwen", kind="qwen2", tie=True)}
    if zoo is not None:
        small = zoo / "small"
        fams["zoo small"] = {"base": small / "base", "e0": small / "reverse", "e1": small / "upper",
                             "e2": small / "sort", "e3": small / "shift"}
    rows = []
    for family, folders in fams.items():
        for gate in ("cheap_embed", "hidden"):
            if family.startswith("qwen2"):
                rows.append({"family": family, "gate_mode": gate, "output": "Qwen MoE",
                             "note": "shared expert: the base",
                             "config": moe_config(folders, gate_mode=gate, experts=["e0", "e1"], shared="base")})
            else:
                rows.append({"family": family, "gate_mode": gate, "output": "Mixtral", "note": "",
                             "config": moe_config(folders, gate_mode=gate)})
    rows.append({"family": "llama", "gate_mode": "hidden", "output": "Qwen MoE",
                 "note": "shared expert: the base; q/k/v biases zeros",
                 "config": moe_config(fams["llama"], gate_mode="hidden", experts=["e0", "e1"], shared="base")})
    rows.append({"family": "qwen2 (tied)", "gate_mode": "cheap_embed", "output": "Qwen MoE",
                 "note": "shared expert: a fine-tune that is no routed expert",
                 "config": moe_config(fams["qwen2 (tied)"], experts=["e0", "e1"], shared="e2")})
    return rows


def measure(mergekit: str, zoo: Path | None) -> dict:
    import torch
    import yaml

    from engine.moe import parse_moe_text, run_moe
    from tests.moe.builders import write_config
    from tests.moe.mergekit_moe import compare, loads, run_mergekit_moe

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="moe-parity-") as tmp:
        root = Path(tmp)
        rows = cases(root / "models", zoo)
        jobs = [(write_config(root / f"{i}.yml", r["config"]), root / "mk" / str(i)) for i, r in enumerate(rows)]
        started = time.perf_counter()
        status = run_mergekit_moe(mergekit, jobs)
        mk_seconds = time.perf_counter() - started
        out = []
        for i, row in enumerate(rows):
            ours = root / "ours" / str(i)
            t0 = time.perf_counter()
            run_moe(parse_moe_text(yaml.safe_dump(row["config"])), ours)
            seconds = time.perf_counter() - t0
            mk = status[str(jobs[i][1])]
            entry = {k: row[k] for k in ("family", "gate_mode", "output", "note")}
            entry.update(experts=len(row["config"]["experts"]), seconds_ours=round(seconds, 2),
                         loads_ours=loads(ours), mergekit_ok=mk["ok"])
            if mk["ok"]:
                result = compare(ours, jobs[i][1])
                entry.update(tensors=result.get("tensors"), max_rel=result.get("max_rel"),
                             max_rel_gates=result.get("max_rel_gates"), loads_mergekit=loads(jobs[i][1]),
                             names_differ=bool(result.get("only_ours") or result.get("only_mergekit")))
                entry["ok"] = bool(result["ok"] and not entry["names_differ"] and entry["max_rel"] <= TOLERANCE
                                   and entry["loads_ours"] and entry["loads_mergekit"])
            else:
                entry.update(mergekit_error=mk.get("error", "")[:160], ok=entry["loads_ours"])
            out.append(entry)
    return {"machine": machine_conditions(), "mergekit_seconds_all": round(mk_seconds, 1),
            "tolerance": TOLERANCE, "rows": out}


def render(data: dict) -> str:
    lines = [
        "Same mergekit-moe config through `mergekit-moe` (mergekit 0.1.5, its own venv, CPU) and "
        "`python -m engine moe`. Tiny fp32 families built offline (Llama untied and tied, Mistral, "
        "Qwen2 with q/k/v biases and tied embeddings; base + 3 fine-tunes, hidden 32, 2 layers) and the "
        "zoo's small family (its base and the reverse, upper, sort and shift fine-tunes). `cheap_embed` "
        "and `hidden` gates are deterministic, so every tensor is compared, routers included: the "
        "largest relative difference |ours - mergekit| / |mergekit| over all tensors, and over the "
        "routers alone (mergekit's per-expert Qwen MoE names mapped onto transformers 5's fused "
        "layout, ours). Both outputs are loaded with `AutoModelForCausalLM` and run once.",
        "",
        "Reproduce: `python bench/moe_parity.py --mergekit VENV/bin/mergekit-moe --zoo ZOO --readme` "
        "(the tests: `MERGEKIT_MOE=VENV/bin/mergekit-moe pytest tests/moe/test_mergekit_moe_parity.py`).",
        "",
        "| family | gates | output | experts | tensors | max rel. diff | routers | loads (ours, mk) | ok | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        if r["mergekit_ok"]:
            cells = [str(r["tensors"]), f"{r['max_rel']:.1e}", f"{r['max_rel_gates']:.1e}",
                     f"{'yes' if r['loads_ours'] else 'no'}, {'yes' if r['loads_mergekit'] else 'no'}"]
            note = r["note"]
        else:
            cells = ["", "", "", f"{'yes' if r['loads_ours'] else 'no'}, mergekit fails"]
            note = (r["note"] + "; " if r["note"] else "") + f"mergekit: `{r['mergekit_error']}`"
        lines.append(f"| {r['family']} | {r['gate_mode']} | {r['output']} | {r['experts']} | "
                     + " | ".join(cells) + f" | {'yes' if r['ok'] else 'NO'} | {note} |")
    lines += ["", f"Measured on {data['machine']['cores']} cores, torch {data['machine']['torch']}, "
              f"{data['machine']['date']}; raw numbers in `bench/results/moe_parity.json`."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit", default=os.environ.get("MERGEKIT_MOE"), help="mergekit-moe executable")
    parser.add_argument("--zoo", default=None, help="a zoo folder (its small family becomes a row)")
    parser.add_argument("--readme", action="store_true", help="write the bench/README.md section")
    parser.add_argument("--render", action="store_true", help="only render the README section")
    args = parser.parse_args(argv)
    if args.render:
        data = json.loads(OUT.read_text())
    else:
        if not args.mergekit:
            parser.error("--mergekit (or $MERGEKIT_MOE) is needed")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        data = measure(args.mergekit, Path(args.zoo).absolute() if args.zoo else None)
        OUT.write_text(json.dumps(data, indent=2) + "\n")
    text = render(data)
    print(text)
    if args.readme or args.render:
        write_readme_section(SECTION, text)
    return 0 if all(r["ok"] for r in data["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
