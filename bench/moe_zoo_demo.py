"""The zoo's five small fine-tunes as one 5-expert Mixtral: routed accuracy per task.

Each fine-tune (reverse, upper, shift, sort, increment) becomes an expert of every layer; its
routing prompts are 8 prompts of its task's training split (``engine.moe.prompts``), the
gates computed from them (mergekit-moe's semantics; ``hidden`` is its default). The MoE is
assembled with ``python -m engine moe`` and scored with ``python -m engine eval --json`` on the
held-out examples of the five tasks; the base's and each fine-tune's own scores are the zoo
manifest's (the same evaluator and held-out sets).

Two diagnostics explain the numbers: the **MLP-only bound**, each fine-tune's MLPs on the
base's attention, embeddings and norms (what an MoE that routed every token of a task to its
own expert would compute), scored by the same evaluator; and the **routing agreement**, the
fraction of the held-out prompts' tokens (every layer) whose top-1 router choice is the task's
own expert.

    python bench/moe_zoo_demo.py --zoo ZOO [--readme]
    python bench/moe_zoo_demo.py --render
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._common import RESULTS, machine_conditions, write_readme_section  # noqa: E402

SECTION = "## MoE of the zoo's five small fine-tunes"
OUT = RESULTS / "moe_zoo_demo.json"
TASKS = ["reverse", "upper", "shift", "sort", "increment"]
VARIANTS = [("hidden", 2), ("hidden", 1), ("cheap_embed", 2), ("cheap_embed", 1)]


def _engine(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"engine {' '.join(args[:1])} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return proc.stdout


def mlp_only_bound(zoo: Path, n: int) -> dict[str, float]:
    """Each fine-tune's own-task accuracy with every tensor outside its MLPs taken from the base."""
    from engine.evaluate.loading import evaluate_state_dict, load_tokenizer
    from engine.io import ModelFolder

    out = {}
    with ModelFolder(zoo / "small" / "base") as base:
        tokenizer = load_tokenizer(base.path, base.config.get("vocab_size"))
        base_tensors = dict(base.iter_tensors())
        for task in TASKS:
            with ModelFolder(zoo / "small" / task) as tuned:
                state = {name: (tensor if ".mlp." in name else base_tensors[name])
                         for name, tensor in tuned.iter_tensors()}
            result = evaluate_state_dict(state, base.config, tokenizer, tasks=[task], n_per_task=n,
                                         n_generic=0)
            out[task] = result["tasks"][task]["accuracy"]
    return out


def routing_agreement(folder: Path, n: int) -> dict[str, float]:
    """Per task: the fraction of (token, layer) pairs of its held-out prompts whose top-1
    router choice is the task's expert (expert i is TASKS[i])."""
    import torch

    from engine.evaluate.loading import load_model_folder
    from engine.evaluate.tasks import TASKS as ALL, heldout_examples

    model, tokenizer = load_model_folder(folder)
    out = {}
    for index, task in enumerate(TASKS):
        hits = total = 0
        for prompt, _answer in heldout_examples(ALL[task], n):
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=ids, output_router_logits=True).router_logits
            for layer_logits in logits:
                top = layer_logits.argmax(dim=-1)
                hits += int((top == index).sum())
                total += top.numel()
        out[task] = hits / total
    return out


def measure(zoo: Path) -> dict:
    import yaml

    from engine.moe.prompts import zoo_task_prompts
    from engine.zoo import load_manifest

    manifest = load_manifest(zoo)
    entries = {m["path"]: m for m in manifest["models"]}
    base = entries["small/base"]
    rows = {"base": {t: base["accuracy"][t] for t in TASKS}}
    rows["own fine-tune"] = {t: entries[f"small/{t}"]["accuracy"][t] for t in TASKS}
    experts = []
    for task in TASKS:
        folder = zoo / "small" / task
        found, prompts = zoo_task_prompts(folder, n=8)
        assert found == task, (folder, found)
        experts.append({"source_model": str(folder), "positive_prompts": prompts})
    variants, routing = [], {}
    with tempfile.TemporaryDirectory(prefix="moe-demo-") as tmp:
        for gate_mode, k in VARIANTS:
            config = {"base_model": str(zoo / "small" / "base"), "gate_mode": gate_mode,
                      "dtype": "float32", "experts_per_token": k, "experts": experts}
            path = Path(tmp) / f"{gate_mode}-{k}.yml"
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            out = Path(tmp) / f"{gate_mode}-{k}"
            summary = json.loads(_engine("moe", str(path), "--out", str(out), "--json", "--quiet"))
            scores = json.loads(_engine("eval", str(out), "--tasks", ",".join(TASKS), "--json"))
            label = f"MoE, {gate_mode} gates, {k} expert{'s' if k > 1 else ''} per token"
            rows[label] = {t: scores["tasks"][t]["accuracy"] for t in TASKS}
            n_eval = scores["tasks"][TASKS[0]]["n"]
            if k == 1:  # the routers do not depend on k
                routing[f"{gate_mode} gates"] = routing_agreement(out, n_eval)
            variants.append({"label": label, "gate_mode": gate_mode, "experts_per_token": k,
                             "seconds_assemble": summary["seconds"], "n_per_task": scores["tasks"][TASKS[0]]["n"]})
    rows["bound: fine-tune's MLPs on the base's attention"] = mlp_only_bound(zoo, n_eval)
    return {"routing_agreement": routing, "machine": machine_conditions(), "zoo": {"quick": manifest.get("quick"), "seed": manifest.get("seed")},
            "prompts_per_expert": 8, "rows": rows, "variants": variants}


def render(data: dict) -> str:
    n = data["variants"][0]["n_per_task"]
    lines = [
        "The full zoo's five small fine-tunes (reverse, upper, shift, sort, increment) as the five "
        "experts of one Mixtral over the small base (`python -m engine moe`, mergekit-moe's config; "
        f"each expert's routing prompts: {data['prompts_per_expert']} prompts of its task's training split). "
        f"Exact match on {n} held-out examples per task (`python -m engine eval --json`); the base's and "
        "each fine-tune's own scores are the zoo manifest's (same evaluator, same held-out sets).",
        "",
        "Reproduce: `python bench/moe_zoo_demo.py --zoo ZOO --readme` (full zoo, seed 0).",
        "",
        "| model | " + " | ".join(TASKS) + " | mean |",
        "|---" * (len(TASKS) + 2) + "|",
    ]
    for label, scores in data["rows"].items():
        mean = sum(scores[t] for t in TASKS) / len(TASKS)
        lines.append(f"| {label} | " + " | ".join(f"{scores[t]:.3f}" for t in TASKS) + f" | {mean:.3f} |")
    bound = data["rows"].get("bound: fine-tune's MLPs on the base's attention")
    if bound:
        lines += ["", f"An MoE of these fine-tunes is capped by the MLP-only bound (mean "
                  f"{sum(bound.values()) / len(bound):.3f}): the zoo's fine-tunes are full fine-tunes "
                  "whose attention changed too, and an MoE keeps only their MLPs. Routing also falls "
                  "short of the task's own expert: every zoo prompt ends in `=`, the last token that "
                  "`hidden` gates read, so the rows differ only by what the earlier tokens left in "
                  "the state at that position (at layer 0, not at all)."]
    lines += ["", "Routing agreement (fraction of held-out prompt tokens, every layer, whose top-1 "
              "expert is the task's own; chance is 0.2):", "",
              "| gates | " + " | ".join(TASKS) + " |", "|---" * (len(TASKS) + 1) + "|"]
    for label, scores in data.get("routing_agreement", {}).items():
        lines.append(f"| {label} | " + " | ".join(f"{scores[t]:.2f}" for t in TASKS) + " |")
    lines += ["", "Assembly seconds: " + ", ".join(f"{v['label']} {v['seconds_assemble']:.1f}"
                                                 for v in data["variants"]) + ".",
              f"Measured on {data['machine']['cores']} cores, torch {data['machine']['torch']}, "
              f"{data['machine']['date']}; raw numbers in `bench/results/moe_zoo_demo.json`."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", help="a complete zoo folder")
    parser.add_argument("--readme", action="store_true")
    parser.add_argument("--render", action="store_true")
    args = parser.parse_args(argv)
    if args.render:
        data = json.loads(OUT.read_text())
    else:
        if not args.zoo:
            parser.error("--zoo is needed")
        data = measure(Path(args.zoo).absolute())
        OUT.write_text(json.dumps(data, indent=2) + "\n")
    text = render(data)
    print(text)
    if args.readme or args.render:
        write_readme_section(SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
