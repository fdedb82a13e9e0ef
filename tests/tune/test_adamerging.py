"""AdaMerging on the quick zoo: zero steps is task arithmetic at the prior 0.3; coefficients
stay in [0, 1]; a tensor whose task vectors are zero gets no gradient; the entropy falls; the
plain recipe reproduces the learned merge through the ordinary merge spec."""

import pytest
import torch

from engine.tune.adamerging import adamerging, coefficient_recipe, merged_state


@pytest.fixture(scope="module")
def session(quick_zoo):
    from engine.merge.whatif import WhatIfSession

    return WhatIfSession(quick_zoo / "small/base", [quick_zoo / "small/reverse", quick_zoo / "small/upper"],
                         tasks=["reverse", "upper"], n_per_task=8, n_generic=0, split="dev")


def prompts():
    from engine.tune.adamerging_run import dev_prompts

    return [dev_prompts("reverse", 16), dev_prompts("upper", 16)]


def learn(session, **kw):
    return adamerging(session.base, session.finetunes, session.model, session.tokenizer, prompts(),
                      max_new_tokens=[7, 7], batch=4, batches_per_task=1, **kw)


def test_zero_steps_is_task_arithmetic_at_the_prior(session):
    result = learn(session, steps=0)
    assert result.coefficients == pytest.approx([0.3, 0.3])
    reference = session.merge("task_arithmetic", [{"weight": 0.3}, {"weight": 0.3}], {"lambda": 1.0})
    names = [n for n, t in session.base.items() if t.is_floating_point()]
    ours = merged_state(session.base, [{n: f[n] - session.base[n] for n in names} for f in session.finetunes],
                        torch.tensor([0.3, 0.3]), names, "task")
    for name in names:  # float64 reference: b + 0.3 (f1 - b) + 0.3 (f2 - b)
        exact = (session.base[name].double() + sum(0.3 * (f[name].double() - session.base[name].double())
                                                   for f in session.finetunes))
        assert torch.allclose(ours[name].double(), exact, atol=1e-6)
        assert torch.allclose(reference[name].double(), exact, atol=1e-6)


def test_coefficients_are_clamped_and_entropy_falls(session):
    few = [p[:4] for p in prompts()]  # batch 4: the same prompts every step, a fixed objective
    result = adamerging(session.base, session.finetunes, session.model, session.tokenizer, few,
                        max_new_tokens=[7, 7], batch=4, batches_per_task=1, steps=6, lr=0.05)
    assert all(0.0 <= c <= 1.0 for c in result.coefficients)
    assert len(result.entropy) == 6 and result.entropy[-1] < result.entropy[0]


def test_tensor_wise_zero_task_vector_gets_no_gradient(session):
    names = [n for n, t in session.base.items() if t.is_floating_point()]
    frozen = names[0]
    finetunes = [dict(f) for f in session.finetunes]
    for f in finetunes:
        f[frozen] = session.base[frozen].clone()  # no task vector for this tensor
    result = adamerging(session.base, finetunes, session.model, session.tokenizer, prompts(),
                        max_new_tokens=[7, 7], batch=4, batches_per_task=1, steps=3, lr=0.2,
                        granularity="tensor")
    for coef in result.coefficients:
        assert coef[frozen] == pytest.approx(0.3)  # Adam never moved it: zero gradient
        assert all(0.0 <= v <= 1.0 for v in coef.values())
        assert any(abs(v - 0.3) > 1e-3 for v in coef.values())  # the others learned


def test_recipe_reproduces_the_learned_merge(session, quick_zoo):
    from engine.merge.spec import MergeSpec
    from engine.recipe import parse_recipe

    result = learn(session, steps=2, lr=0.2, granularity="tensor")
    plain = coefficient_recipe({"merge_method": "task_arithmetic", "base_model": str(quick_zoo / "small/base"),
                                "models": [{"model": str(quick_zoo / "small/reverse")},
                                           {"model": str(quick_zoo / "small/upper")}]}, result)
    recipe = parse_recipe(plain)
    spec = MergeSpec.build("task_arithmetic", recipe.parameter_scopes(),
                           [m.parameters for m in recipe.input_models()], num_layers=session.num_layers)
    merged = session._merge(spec)
    names = [n for n, t in session.base.items() if t.is_floating_point()]
    lam = torch.tensor([[c[n] for n in names] for c in result.coefficients])
    ours = merged_state(session.base, [{n: f[n] - session.base[n] for n in names} for f in session.finetunes],
                        lam, names, "tensor")
    for name in names:
        assert torch.allclose(merged[name], ours[name], atol=1e-6), name


def test_tune_sampler_adamerging_writes_a_plain_recipe(quick_zoo, tmp_path, capsys):
    import json

    import yaml

    from engine.__main__ import main

    recipe = tmp_path / "r.yml"
    recipe.write_text(f"""merge_method: task_arithmetic
base_model: {quick_zoo}/small/base
models:
  - model: {quick_zoo}/small/reverse
  - model: {quick_zoo}/small/upper
""")
    out = tmp_path / "best.yml"
    assert main(["tune", str(recipe), "--trials", "1", "--out", str(out), "--sampler", "adamerging",
                 "--steps", "1", "--n-per-task", "8", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    plain = yaml.safe_load(out.read_text())
    weights = [m["parameters"]["weight"] for m in plain["models"]]
    assert all(0.0 <= w <= 1.0 for w in weights) and summary["steps"] == 1
    assert plain["merge_method"] == "task_arithmetic" and plain["parameters"] == {"lambda": 1.0}
    assert set(summary["best_tasks"]) == {"reverse", "upper"}
