"""Which training options (ours, ``engine.zoo.mllm.train_member``) make the mllm members
mergeable: each recipe trains the two fusion members (``top`` and ``bottom`` over the zoo's
small/base, the zoo's member seeds, one shared data seed) and scores them alone, each member's
own LM fed both token streams, and the fused model (merged LM + both streams).

    OMP_NUM_THREADS=1 python bench/visionfuse_ablation.py --zoo ZOO_DIR [--recipes a,b] [--jobs 4]
    python bench/visionfuse_ablation.py --render

Each member trains in its own process (``--jobs`` at once, one torch thread each); the zoo
only needs small/base. Rows are added to ``bench/results/visionfuse_ablation.json`` by recipe
name (a rerun of one recipe replaces its row).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import write_marked_section  # noqa: E402
from bench.visionfuse import delta_geometry  # noqa: E402

RESULTS = REPO / "bench" / "results" / "visionfuse_ablation.json"
MARK = "visionfuse-ablation"
DATA_SEED = 123  # one data seed for both members of every recipe (the zoo derives its own)
TASKS = ("ocr", "vrev")
# every recipe: 0..8 null tokens around the block; the options below on top
RECIPES = {
    "anchor1_lm1": {"anchor": 1.0, "second_rendering": 0.5, "lm_lr_scale": 1.0},
    "anchor1_lm0.3": {"anchor": 1.0, "second_rendering": 0.5, "lm_lr_scale": 0.3},
    "anchor1_lm0.1": {"anchor": 1.0, "second_rendering": 0.5, "lm_lr_scale": 0.1},
    "anchor3_lm0.3": {"anchor": 3.0, "second_rendering": 0.5, "lm_lr_scale": 0.3},
}
FUSIONS = [("task_arithmetic", {}, [1.0, 1.0], "TA lambda 1"),
           ("task_arithmetic", {}, [0.5, 0.5], "TA lambda 0.5"),
           ("ties", {"density": 0.5}, [1.0, 1.0], "TIES d 0.5")]


def train_one(zoo: str, view: str, options: dict, out: str) -> float:
    """Train the zoo's ``mllm/<view>`` member with ``options``; save its state dict to ``out``
    (a scratch file of this bench, read back below); returns the training seconds."""
    import torch

    from engine.zoo import mllm
    from engine.zoo.build import load_trained_model, stage_seed
    from engine.zoo.plan import zoo_plan

    torch.set_num_threads(1)
    item = next(i for i in zoo_plan(False) if i.path == f"mllm/{view}")
    extra = dict(item.extra)
    seed = stage_seed(0, item.path)
    model = mllm.new_member(load_trained_model(Path(zoo) / "small/base"), extra["patch_size"],
                            extra["vision_hidden"], seed)
    started = time.perf_counter()
    mllm.train_member(model, mllm.plan_view(extra), item.spec, extra["align_steps"],
                      extra["align_lr"], seed, distractors=extra["distractors"],
                      data_seed=DATA_SEED, **options)
    torch.save(model.state_dict(), out)
    return time.perf_counter() - started


def evaluate(zoo: Path, states: dict[str, Path], n: int) -> dict:
    import numpy as np
    import torch
    from transformers import LlamaForCausalLM

    from engine.evaluate.vision_scoring import score_vision
    from engine.visionfuse.fuse import merge_language_models
    from engine.visionfuse.members import Member
    from engine.zoo import mllm
    from engine.zoo.build import load_trained_model
    from engine.zoo.plan import zoo_plan

    base = load_trained_model(zoo / "small/base")
    base_state = {k: v.float() for k, v in base.state_dict().items()}
    members = []
    for view, path in states.items():
        extra = dict(next(i for i in zoo_plan(False) if i.path == f"mllm/{view}").extra)
        model = mllm.new_member(base, extra["patch_size"], extra["vision_hidden"], 0)
        model.load_state_dict(torch.load(path, weights_only=True))
        members.append(Member(Path(view), model.eval(), mllm.plan_view(extra)))
    streams = [s for m in members for s in mllm.streams_of(m.model, m.view)]

    def mean(lm, st):
        tasks = score_vision(lm, st, list(TASKS), n)["tasks"]
        return round(float(np.mean([tasks[t]["accuracy"] for t in TASKS])), 3)

    def lm_of(state):
        lm = LlamaForCausalLM(base.config).float().eval()
        lm.load_state_dict(state)
        return lm

    row = {"alone": {str(m.path): mean(m.model, mllm.streams_of(m.model, m.view))
                     for m in members},
           "own_lm_both": {str(m.path): mean(lm_of(m.lm_state), streams) for m in members},
           "fused": {}}
    for method, params, weights, label in FUSIONS:
        merged = merge_language_models(base_state, members, method, params, weights)
        row["fused"][label] = mean(lm_of(merged), streams)
    norms, cosine = delta_geometry(base_state, {str(m.path): m.lm_state for m in members})
    row["relative_norm"] = [round(v, 3) for v in norms.values()]
    row["cosine"] = round(cosine, 3)
    return row


def render(saved: dict) -> str:
    labels = [f[3] for f in FUSIONS]
    lines = ["### Ablation: which training options make the members mergeable",
             "", "`python bench/visionfuse_ablation.py --zoo ZOO` (both members retrained per "
             f"recipe from the zoo's small/base with the zoo's member seeds and data seed "
             f"{DATA_SEED}; {saved.get('n', 128)} held-out images per task; mean exact match "
             "over ocr and vrev). Every recipe has 0-8 null tokens around the block and two "
             "renderings in half the stage-2 batches; `anchor` is the letter-anchor weight, "
             "`LM rate` the LM's learning rate relative to the encoder's. The last row is the "
             "previous zoo recipe (null tokens only, LM at the full rate, each member its own "
             "data), from the zoo build it was published with.", "",
             "| recipe | anchor | LM rate | top alone | bottom alone | own LM, both streams "
             "(top / bottom) | " + " | ".join(f"fused, {x}" for x in labels)
             + " | ||tau|| / ||theta_0|| | cos(tau_top, tau_bottom) |",
             "|---|---|---|---|---|---|" + "---|" * len(labels) + "---|---|"]
    for name, row in saved["rows"].items():
        opts = row.get("options", {})
        both = row["own_lm_both"]
        lines.append(
            f"| {name} | {opts.get('anchor', 0):g} | {opts.get('lm_lr_scale', 1.0):g} | "
            f"{row['alone']['top']:.3f} | {row['alone']['bottom']:.3f} | "
            f"{both['top']:.3f} / {both['bottom']:.3f} | "
            + " | ".join(f"{row['fused'].get(x, float('nan')):.3f}" for x in labels)
            + f" | {' / '.join(f'{v:.3f}' for v in row['relative_norm'])} | {row['cosine']:.3f} |")
    lines += ["", saved.get("note", "")]
    return "\n".join(lines).rstrip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--render", action="store_true")
    args = parser.parse_args(argv)
    saved = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": {}}
    if not args.render:
        if args.zoo is None:
            parser.error("--zoo is required unless --render")
        names = [r for r in args.recipes.split(",") if r]
        unknown = [r for r in names if r not in RECIPES]
        if unknown:
            parser.error(f"unknown recipe(s) {unknown}; known: {list(RECIPES)}")
        with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(args.jobs) as pool:
            jobs = {(r, v): pool.submit(train_one, str(args.zoo), v, RECIPES[r],
                                        str(Path(tmp) / f"{r}_{v}.pt"))
                    for r in names for v in ("top", "bottom")}
            seconds = {k: f.result() for k, f in jobs.items()}
            for r in names:
                row = evaluate(args.zoo, {v: Path(tmp) / f"{r}_{v}.pt" for v in ("top", "bottom")},
                               args.n)
                row["options"] = RECIPES[r]
                row["train_seconds"] = [round(seconds[(r, v)], 1) for v in ("top", "bottom")]
                saved["rows"][r] = row
        saved["n"] = args.n
        RESULTS.write_text(json.dumps(saved, indent=1) + "\n")
    body = render(saved)
    write_marked_section(MARK, body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
