"""Calibration statistics for fisher/regmean against plain references on tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from engine.errors import ParameterError
from engine.evaluate.tasks import MAIN_TASKS, TASKS, is_heldout
from engine.io import ModelFolder, ModelWriter
from engine.merge import get_method
from engine.merge.calibration import (ALL_TASKS, CalibrationStats, calibration_examples, encode,
                                      resolve_tasks, task_list, zoo_task_of)
from engine.merge.fisher_gram import fisher_diagonal, gram_matrices
from engine.merge.executor import run_merge
from engine.merge.methods.regmean import GramStats
from engine.recipe import load_recipe, parse_recipe
from engine.evaluate.tokenizer import VOCAB_SIZE, build_tokenizer
from tests.merge.test_fisher_regmean import regmean_reference


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def tiny_llama(seed=0, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB_SIZE, n_embd=16, n_layer=2, n_head=2, n_positions=64,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def test_examples_are_seeded_training_split_and_cycle_tasks():
    a = calibration_examples("reverse", 10, seed=3)
    assert a == calibration_examples("reverse", 10, seed=3)
    assert a != calibration_examples("reverse", 10, seed=4)
    assert all(not is_heldout(p) and p.startswith("rev:") and ans == p[4:-1][::-1] for p, ans in a)
    mixed = calibration_examples("all", 2 * len(MAIN_TASKS))
    tags = [p.split(":")[0] for p, _ in mixed]
    assert tags == [TASKS[t].tag for t in MAIN_TASKS] * 2  # every main task in turn
    with pytest.raises(ParameterError, match="unknown"):
        calibration_examples("juggle", 4)


def _reference_grams(model, encoded):
    """Per example, no padding, float64: inputs of layer-0/1 q_proj and of lm_head, by hand."""
    model = model.double()
    sums, count = {}, 0
    for ids, _ in encoded:
        out = model(torch.tensor([ids]), output_hidden_states=True)
        hs = out.hidden_states
        xs = {"model.layers.0.self_attn.q_proj.weight": model.model.layers[0].input_layernorm(hs[0])[0],
              "model.layers.1.self_attn.k_proj.weight": model.model.layers[1].input_layernorm(hs[1])[0],
              "lm_head.weight": hs[-1][0]}
        for name, x in xs.items():
            sums[name] = sums.get(name, 0) + x.T @ x
        count += len(ids)
    return {n: s / count for n, s in sums.items()}


def test_gram_matrices_match_a_direct_computation(tok):
    model = tiny_llama()
    encoded = encode(tok, calibration_examples("all", 7, seed=2))
    assert len({len(ids) for ids, _ in encoded}) > 1  # batches need padding
    grams = gram_matrices(model, encoded, pad_id=tok.pad_token_id, batch_size=3)
    reference = _reference_grams(tiny_llama(), encoded)
    for name, ref in reference.items():
        gram, transposed = grams[name]
        assert not transposed and gram.dtype == torch.float32
        torch.testing.assert_close(gram.double(), ref, rtol=1e-4, atol=1e-5)
    # every linear layer has one, shaped (in, in)
    linears = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(grams) == set(linears)
    for name, module in linears.items():
        assert grams[name][0].shape == (module.in_features, module.in_features)


def test_gpt2_conv1d_grams_are_flagged_transposed(tok):
    model = tiny_gpt2()
    encoded = encode(tok, calibration_examples("upper", 5))
    grams = gram_matrices(model, encoded, pad_id=tok.pad_token_id, batch_size=2)
    gram, transposed = grams["transformer.h.0.attn.c_attn.weight"]
    assert transposed and gram.shape == (16, 16)
    assert grams["transformer.h.0.mlp.c_proj.weight"][0].shape == (64, 64)
    ref, count = 0, 0
    with torch.no_grad():
        for ids, _ in encoded:
            hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
            x = model.transformer.h[0].ln_1(hs[0])[0].double()
            ref, count = ref + x.T @ x, count + len(ids)
    torch.testing.assert_close(gram.double(), ref / count, rtol=1e-4, atol=1e-5)


def test_fisher_matches_per_example_gradients_of_the_answer_loss(tok):
    model = tiny_llama(seed=1)
    encoded = encode(tok, calibration_examples("shift", 4, seed=5))
    fisher = fisher_diagonal(model, encoded)
    # reference: float64, HF's own label loss (mean NLL over answer tokens) times their count
    ref_model = tiny_llama(seed=1, dtype=torch.float64)
    params = dict(ref_model.named_parameters())
    sums = {n: torch.zeros_like(p) for n, p in params.items()}
    for ids, prompt_len in encoded:
        labels = torch.tensor([[-100] * prompt_len + ids[prompt_len:]])
        loss = ref_model(torch.tensor([ids]), labels=labels).loss
        log_likelihood = -loss * (len(ids) - prompt_len)
        grads = torch.autograd.grad(log_likelihood, list(params.values()))
        for n, g in zip(params, grads):
            sums[n] += g ** 2
    assert set(fisher) == set(params)
    for name in params:
        torch.testing.assert_close(fisher[name].double(), sums[name] / len(encoded), rtol=2e-3, atol=1e-9)
    # embedding rows of tokens that never occur get no gradient
    seen = {t for ids, _ in encoded for t in ids}
    unseen = [t for t in range(VOCAB_SIZE) if t not in seen]
    assert unseen and float(fisher["model.embed_tokens.weight"][unseen].abs().max()) == 0.0
    assert float(fisher["lm_head.weight"].sum()) > 0


def test_fisher_of_a_tied_model_names_the_head_too(tok):
    model = tiny_gpt2()
    fisher = fisher_diagonal(model, encode(tok, calibration_examples("upper", 2)))
    assert fisher["lm_head.weight"] is fisher["transformer.wte.weight"]


def test_regmean_on_conv1d_weights_transposes(tok):
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(6, 6, generator=g) for _ in range(2)]  # square: layout must come from the flag
    xs = [torch.randn(30, 6, generator=g) for _ in range(2)]
    grams = [x.T @ x for x in xs]
    method = get_method("regmean")
    stored = [w.T.contiguous() for w in ws]  # Conv1D stores (in, out)
    out = method.merge(None, stored, [{}, {}], {"alpha": 0.8, "ridge": 0.0},
                       stats=GramStats(grams=tuple(grams), transposed=True))
    expected = regmean_reference(ws, grams, [1.0, 1.0], 0.8, 0.0).T
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
    plain = method.merge(None, ws, [{}, {}], {"alpha": 0.8, "ridge": 0.0}, stats=grams)
    torch.testing.assert_close(out, plain.T)


def test_stats_provider_shapes():
    fisher = CalibrationStats("fisher", [{"a": torch.ones(2)}, {"a": torch.zeros(2)}])
    assert len(fisher("a")) == 2
    assert fisher("buffer") is None
    assert [t.shape for t in fisher("buffer", like=torch.empty(3, 1))] == [(3, 1), (3, 1)]
    gram = CalibrationStats("gram", [{"w": (torch.eye(2), True)}, {"w": (torch.eye(2), True)}])
    assert isinstance(gram("w"), GramStats) and gram("w").transposed
    assert gram("norm.weight") is None


def test_tasks_come_from_the_zoo_manifest(quick_zoo, tmp_path):
    zoo = Path(quick_zoo)
    assert zoo_task_of(zoo / "small" / "reverse") == "reverse"
    assert zoo_task_of(zoo / "small" / "base") == "all"
    assert zoo_task_of(tmp_path) is None
    assert resolve_tasks([tmp_path], ["upper"]) == ["upper"]
    with pytest.raises(ParameterError, match="calibration_task"):
        resolve_tasks([tmp_path], [None])
    with pytest.raises(ParameterError, match="unknown"):
        resolve_tasks([zoo / "small" / "reverse"], ["juggle"])


def test_merge_and_compress_calibration_read_one_task_rule(quick_zoo, tmp_path):
    """One zoo_task_of: a zoo base is calibrated on every main task by both (compress had its
    own copy, which said None for a base and fell back to the same tasks by another road); an
    entry without a usable task is None for both."""
    import json

    from engine.compress.calibration import default_tasks

    zoo = Path(quick_zoo)
    assert default_tasks(zoo / "small" / "base") == list(MAIN_TASKS) == task_list(zoo_task_of(zoo / "small" / "base"))
    assert default_tasks(zoo / "small" / "reverse") == ["reverse"]
    assert zoo_task_of(zoo / "safety" / "aligned") == "refuse"  # a base trained for a task keeps it
    assert default_tasks(tmp_path) == list(MAIN_TASKS)  # in no zoo: the compressors' default
    own = tmp_path / "zoo"
    entries = [("base", "base", None), ("untasked", "finetune", None), ("odd", "finetune", 7),
               ("listed", "finetune", ["upper", "sort"])]
    for path, _, _ in entries:
        (own / path).mkdir(parents=True)
    (own / "zoo.json").write_text(json.dumps({"models": [{"path": p, "role": r, "task": t}
                                                         for p, r, t in entries]}))
    assert zoo_task_of(own / "base") == ALL_TASKS
    assert [zoo_task_of(own / p) for p in ("untasked", "odd", "listed")] == [None, None, None]
    assert zoo_task_of(own / "base" / "..") is None  # the zoo folder itself is no model


def _folder(tmp: Path, name: str, model) -> Path:
    with ModelWriter(tmp / name, config=model.config.to_dict()) as w:
        for k, v in model.state_dict().items():
            w.add_tensor(k, v)
    return tmp / name


def test_run_merge_calibrates_outside_a_zoo_with_explicit_tasks(tmp_path, tok):
    a, b = _folder(tmp_path, "a", tiny_llama(seed=3)), _folder(tmp_path, "b", tiny_llama(seed=4))
    data = {"merge_method": "regmean", "parameters": {"calibration": {"n": 5, "seed": 2}, "alpha": 0.9},
            "models": [{"model": str(a), "parameters": {"calibration_task": "reverse"}},
                       {"model": str(b), "parameters": {"calibration_task": ["upper", "lookup"]}}]}
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(data))
    out = run_merge(load_recipe(tmp_path / "recipe.yml"), tmp_path / "out", device="cpu").out
    with ModelFolder(out) as mf:
        merged = mf.get_tensor("model.layers.1.mlp.down_proj.weight")
    # the same statistics computed by hand
    models = [tiny_llama(seed=3), tiny_llama(seed=4)]
    grams = [gram_matrices(m, encode(tok, calibration_examples(t, 5, seed=2)), batch_size=16)
             for m, t in zip(models, ("reverse", ["upper", "lookup"]))]
    name = "model.layers.1.mlp.down_proj.weight"
    expected = regmean_reference([m.state_dict()[name] for m in models], [g[name][0] for g in grams],
                                 [1.0, 1.0], 0.9, 1e-6)
    torch.testing.assert_close(merged.double(), expected, rtol=1e-3, atol=1e-5)
    # without tasks, outside a zoo: refused before anything is written
    del data["models"][0]["parameters"]
    with pytest.raises(ParameterError, match="calibration_task"):
        run_merge(parse_recipe(data), tmp_path / "refused", device="cpu")
    assert not (tmp_path / "refused").exists()
    with pytest.raises(ParameterError, match="calibration"):
        run_merge(parse_recipe({**data, "parameters": {"calibration": 64}}), tmp_path / "refused", device="cpu")
    with pytest.raises(ParameterError, match="calibration: n"):
        run_merge(parse_recipe({**data, "parameters": {"calibration": {"n": 0}}}), tmp_path / "refused",
                  device="cpu")


@pytest.mark.parametrize("kind", ["fisher", "gram"])
def test_spilled_statistics_equal_the_in_memory_ones(tmp_path, tok, kind):
    """Streamed merges spill each model's statistics to disk: what comes back per tensor is
    bit-identical to the in-memory statistics, for a tied GPT-2 (Conv1D, head = embedding) and a
    Llama; the temporary folder is gone after close()."""
    from engine.merge.calibration import compute_stats

    folders = [_folder(tmp_path, "g", tiny_gpt2(seed=5)), _folder(tmp_path, "l", tiny_llama(seed=6))]
    for folder in folders:
        in_ram = compute_stats(kind, [folder, folder], ["reverse", "upper"], {"n": 3})
        spilled = compute_stats(kind, [folder, folder], ["reverse", "upper"], {"n": 3}, spill=True)
        spill_dir = spilled.folder
        assert spill_dir is not None and len(list(spill_dir.glob("model-*.safetensors"))) == 2
        names = list(in_ram.per_model[0])
        assert names and all(spilled.per_model[0].get(n) is not None for n in names)
        for name in names:
            a, b = in_ram(name), spilled(name)
            if kind == "fisher":
                for x, y in zip(a, b):
                    assert torch.equal(x, y), name
            else:
                assert a.transposed == b.transposed
                for x, y in zip(a.grams, b.grams):
                    assert torch.equal(x, y), name
        if kind == "fisher" and "transformer.wte.weight" in names:  # GPT-2, tied: stored once, aliased
            assert spilled.per_model[0]._alias == {"lm_head.weight": "transformer.wte.weight"}
            assert torch.equal(spilled("lm_head.weight")[0], spilled("transformer.wte.weight")[0])
        spilled.close()
        assert not spill_dir.exists()


def test_run_merge_removes_its_calibration_spill_even_when_the_merge_fails(tmp_path, tok, monkeypatch):
    import tempfile

    from engine.merge import executor

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    a, b = _folder(tmp_path, "a", tiny_llama(seed=3)), _folder(tmp_path, "b", tiny_llama(seed=4))
    data = {"merge_method": "fisher", "parameters": {"calibration": {"n": 3}},
            "models": [{"model": str(a), "parameters": {"calibration_task": "reverse", "weight": 1.0}},
                       {"model": str(b), "parameters": {"calibration_task": "upper", "weight": 1.0}}]}
    run_merge(parse_recipe(data), tmp_path / "out", device="cpu")
    assert list((tmp_path / "tmp").iterdir()) == []

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(executor, "read_inputs", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        run_merge(parse_recipe(data), tmp_path / "out2", device="cpu")
    assert list((tmp_path / "tmp").iterdir()) == [] and not (tmp_path / "out2").exists()
