"""Train the zoo models a plan has and a built zoo lacks (new models of a published family),
with the zoo build's own code and seeds, into that zoo, and add them to its zoo.json.

``zoo build --resume`` keeps a published family whole or refuses it; this adds models to it
instead, each trained from its parent as the build trains it (same per-model seed, steps, data),
evaluated on the same held-out sets. The zoo.json then lists them with their measurements and
``added_models`` names them (``build_seconds`` stays the original build's).

    OMP_WAIT_POLICY=PASSIVE python bench/zoo_add_models.py ZOO_DIR [THREADS]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from engine.evaluate.scoring import Evaluator  # noqa: E402
from engine.evaluate.tokenizer import build_tokenizer  # noqa: E402
from engine.zoo import MANIFEST_NAME  # noqa: E402
from engine.evaluate.tokenizer import tokenizer_files  # noqa: E402
from engine.zoo.build import _entry, load_trained_model, stage_seed, write_model  # noqa: E402
from engine.zoo.plan import FULL_ARCHS, QUICK_ARCHS, zoo_plan  # noqa: E402
from engine.zoo.train import train  # noqa: E402
from engine.zoo import mllm  # noqa: E402
from engine.zoo.plan import MLLM_FAMILY  # noqa: E402


def main(zoo: Path) -> None:
    manifest = json.loads((zoo / MANIFEST_NAME).read_text())
    quick, seed = bool(manifest["quick"]), int(manifest["seed"])
    archs = QUICK_ARCHS if quick else FULL_ARCHS
    n_eval = manifest["models"][0]["n_eval"]
    have = {m["path"] for m in manifest["models"]}
    tokenizer = build_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        tok_files = tokenizer_files(tmp)
    added = []
    for item in zoo_plan(quick):
        if item.path in have:
            continue
        seed_i = stage_seed(seed, item.path)
        model = load_trained_model(zoo / item.parent)
        started = time.time()
        more_files = None
        if item.family == MLLM_FAMILY:  # a LLaVA member over its parent LM
            model = mllm.build_member(item, model, seed_i,
                                      family_seed=stage_seed(seed, mllm.DATA_SEED_NAME))
            seconds = time.time() - started
            view = mllm.plan_view(dict(item.extra))
            scores = mllm.score_member(model, view, tokenizer, n_eval)
            more_files = mllm.member_files(view)
        else:
            train(model, item.spec, seed_i, lambda step, loss: None)
            seconds = time.time() - started
            scores = Evaluator(model, tokenizer, None, n_eval, n_eval).evaluate()
        entry = _entry(item, archs[item.arch], model, seconds, scores, seed_i)
        write_model(zoo / item.path, model, tok_files, entry, more_files)
        manifest["models"].append(entry)
        added.append(item.path)
        print(item.path, f"{seconds:.0f}s", {k: round(v, 3) for k, v in entry["accuracy"].items()},
              file=sys.stderr)
    manifest["added_models"] = manifest.get("added_models", []) + added
    (zoo / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    main(Path(sys.argv[1]))
