"""Tiny LLaVA members over the quick zoo's LMs (a few training steps each), written once per
session as the zoo build writes its mllm family: ``top``/``bottom`` over small/base, and
``control`` over large/base (another LM)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def members(quick_zoo, tmp_path_factory):
    import torch

    from engine.evaluate.tokenizer import tokenizer_files
    from engine.zoo.build import load_trained_model, write_model
    from engine.zoo import mllm
    from engine.zoo.plan import with_replay
    from engine.zoo.train import TrainSpec

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("members")
    with tempfile.TemporaryDirectory() as tmp:
        tok = tokenizer_files(tmp)
    spec = TrainSpec(steps=4, lr=1e-3, batch_size=4,
                     mixture=with_replay({"ocr": 0.5, "vrev": 0.5}), warmup=1)
    out = {}
    for name, parent, view, patch in (("top", "small/base", "top", 3),
                                      ("bottom", "small/base", "bottom", 4),
                                      ("control", "large/base", "top", 3)):
        lm = load_trained_model(Path(quick_zoo) / parent)
        model = mllm.new_member(lm, patch, 16, seed=len(out))
        v = mllm.plan_view({"view": view})
        mllm.train_member(model, v, spec, 2, 3e-3, seed=len(out))
        write_model(root / name, model, tok, {"path": f"mllm/{name}", "family": "mllm"},
                    mllm.member_files(v))
        out[name] = root / name
    out["base"] = Path(quick_zoo) / "small/base"
    out["text"] = Path(quick_zoo) / "small/upper"
    return out
