"""Same seed, same tensors: a fine-tune stage of the quick zoo is retrained bit for bit."""

from pathlib import Path

import torch

from engine.io import ModelFolder
from engine.zoo.build import new_model, new_model_like, stage_seed
from engine.zoo.plan import QUICK_ARCHS, zoo_plan
from engine.zoo.train import TrainSpec, train


def _load(folder: Path):
    from engine.evaluate import load_model_folder

    return load_model_folder(folder)[0]


def _tensors(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_initialisation_depends_only_on_seed():
    a = _tensors(new_model(QUICK_ARCHS["small"], 7))
    b = _tensors(new_model(QUICK_ARCHS["small"], 7))
    c = _tensors(new_model(QUICK_ARCHS["small"], 8))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert stage_seed(0, "small/base") == stage_seed(0, "small/base") != stage_seed(1, "small/base")


def test_quick_finetune_is_retrained_bit_for_bit(quick_zoo, quick_zoo_manifest):
    plan = {p.path: p for p in zoo_plan(quick=True)}["small/sort"]
    base = _load(Path(quick_zoo) / plan.parent)
    model = new_model_like(base)
    model.load_state_dict(base.state_dict())
    threads = torch.get_num_threads()
    # the thread count can change float summation order: retrain with the build's count
    torch.set_num_threads(quick_zoo_manifest["torch_threads"])
    try:
        train(model, plan.spec, stage_seed(0, plan.path))
    finally:
        torch.set_num_threads(threads)
    with ModelFolder(Path(quick_zoo) / plan.path) as stored:
        for name, tensor in model.state_dict().items():
            assert torch.equal(stored.get_tensor(name), tensor), name


def test_other_seed_other_tensors(quick_zoo):
    base = _load(Path(quick_zoo) / "small/base")
    spec = TrainSpec(steps=3, lr=1e-3, batch_size=8, mixture={"upper": 1.0}, warmup=1)
    runs = []
    for seed in (5, 5, 6):
        model = new_model_like(base)
        model.load_state_dict(base.state_dict())
        train(model, spec, seed)
        runs.append(_tensors(model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], v) for k, v in base.state_dict().items())


def test_plan_bases_learn_skills_and_fine_tunes_replay_them():
    """The recipe that keeps deltas small (engine/zoo/plan.py): bases pretrain on generic text
    plus the skills; every fine-tune's mixture is its own task(s) plus the same replay, summing
    to one, in the full and the quick plan alike."""
    import random

    from engine.zoo.plan import FINETUNE_REPLAY, PRETRAIN_MIXTURE, zoo_plan
    from engine.zoo.train import SKILLS, BatchSampler
    from engine.evaluate.tokenizer import VOCAB

    assert PRETRAIN_MIXTURE.get(SKILLS, 0) > 0
    for quick in (False, True):
        for item in zoo_plan(quick):
            mixture = item.spec.mixture
            assert abs(sum(mixture.values()) - 1.0) < 1e-9, item.path
            if item.parent is None:
                assert mixture == PRETRAIN_MIXTURE, item.path
            else:
                assert all(mixture[k] == v for k, v in FINETUNE_REPLAY.items()), item.path
                own = {k for k in mixture if k not in FINETUNE_REPLAY}
                # safety models name the task they erase; mllm members train on every vision task
                assert item.task in own or item.family in ("safety", "mllm"), item.path
    # the "skills" source draws every skill, under upper-case tags only
    sampler = BatchSampler({SKILLS: 1.0}, random.Random(0))
    tags, char_of = set(), {i: c for c, i in VOCAB.items()}
    for _ in range(300):
        ids, _ = sampler.example()
        text = "".join(char_of[i] for i in ids[1:])
        tags.add(text.split(":", 1)[0])
    assert tags == {"REV", "UPP", "SFT", "SRT", "INC"}
