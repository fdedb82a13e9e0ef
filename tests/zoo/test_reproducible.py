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
