"""engine.delta: streamed fp32 task vectors and layout checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.delta import iter_task_vectors, plan_deltas, task_vector
from engine.errors import IncompatibleModelsError
from engine.io import ModelFolder
from tests.analysis.helpers import CONFIG, base_tensors, finetune_tensors, np64
from tests.io.builders import write_model


def test_bf16_task_vectors_are_fp32_differences(tmp_path):
    base = base_tensors(torch.bfloat16)
    ft = finetune_tensors(base, seed=1, scale=1e-3)  # small update: bf16 subtraction would cancel
    write_model(tmp_path / "b", base, config=dict(CONFIG))
    write_model(tmp_path / "f", ft, config=dict(CONFIG))
    with ModelFolder(tmp_path / "b") as b, ModelFolder(tmp_path / "f") as f:
        plan = plan_deltas(b, [f])
        seen = []
        for name, base32, deltas in iter_task_vectors(plan):
            assert base32.dtype == torch.float32 and deltas[0].dtype == torch.float32
            expected = np64(ft[name]) - np64(base[name])  # exact: bf16 values are exact in f64
            np.testing.assert_array_equal(np64(deltas[0]), expected.astype(np.float32))
            seen.append(name)
        assert seen == plan.names == b.tensor_names


def test_prefetch_and_plain_reading_agree(tmp_path):
    base = base_tensors()
    write_model(tmp_path / "b", base, config=dict(CONFIG))
    for k in range(2):
        write_model(tmp_path / f"f{k}", finetune_tensors(base, seed=k), config=dict(CONFIG))
    with ModelFolder(tmp_path / "b") as b, ModelFolder(tmp_path / "f0") as f0, ModelFolder(tmp_path / "f1") as f1:
        plan = plan_deltas(b, [f0, f1])
        fast = {n: [d.clone() for d in ds] for n, _, ds in iter_task_vectors(plan)}
        slow = {n: ds for n, _, ds in iter_task_vectors(plan, prefetch=False)}
        assert fast.keys() == slow.keys()
        for name in fast:
            for x, y in zip(fast[name], slow[name]):
                assert torch.equal(x, y)
        single = task_vector(b, f1, "lm_head.weight")
        assert torch.equal(single, fast["lm_head.weight"][1])


def test_shape_mismatch_names_the_tensor(tmp_path):
    base = base_tensors()
    ft = dict(finetune_tensors(base, seed=1))
    ft["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    ft.pop("model.norm.weight")
    write_model(tmp_path / "b", base, config=dict(CONFIG))
    write_model(tmp_path / "f", ft, config=dict(CONFIG))
    with ModelFolder(tmp_path / "b") as b, ModelFolder(tmp_path / "f") as f:
        with pytest.raises(IncompatibleModelsError) as info:
            plan_deltas(b, [f])
    err = info.value
    assert err.tensor in ("model.layers.1.mlp.up_proj.weight", "model.norm.weight")
    assert "model.layers.1.mlp.up_proj.weight" in str(err) and "(3, 3)" in str(err)
    assert "model.norm.weight" in str(err) and "missing" in str(err)
    assert len(err.reasons) == 2 and str(tmp_path / "f") in err.path


def test_tied_finetune_uses_its_embedding_as_head(tmp_path):
    base = base_tensors()
    ft = finetune_tensors(base, seed=3)
    tied = {k: v for k, v in ft.items() if k != "lm_head.weight"}
    write_model(tmp_path / "b", base, config=dict(CONFIG))
    write_model(tmp_path / "f", tied, config={**CONFIG, "tie_word_embeddings": True})
    with ModelFolder(tmp_path / "b") as b, ModelFolder(tmp_path / "f") as f:
        plan = plan_deltas(b, [f])
        assert plan.source_name(0, "lm_head.weight") == "model.embed_tokens.weight"
        head = task_vector(b, f, "lm_head.weight")
    np.testing.assert_allclose(np64(head), np64(ft["model.embed_tokens.weight"]) - np64(base["lm_head.weight"]),
                               rtol=0, atol=1e-6)


def test_no_finetunes_is_refused(tmp_path):
    write_model(tmp_path / "b", base_tensors(), config=dict(CONFIG))
    with ModelFolder(tmp_path / "b") as b:
        with pytest.raises(IncompatibleModelsError):
            plan_deltas(b, [])
