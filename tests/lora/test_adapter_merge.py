"""Merging LoRA adapters: a task_arithmetic merge at weight 1 of ``BASE+ADAPTER`` equals PEFT's
``merge_and_unload()``; an adapter folder alone takes the recipe's base; two adapters merge as
their two merged models do; the adapter path needs no merged copy on disk."""

from __future__ import annotations

import pytest
import torch

from engine.__main__ import main
from engine.io import ModelFolder
from tests.lora.peft_builders import make_adapter, save_merged, tiny_gpt2, tiny_llama


def _merge(tmp_path, recipe: str, out="out", capsys=None):
    path = tmp_path / f"{out}.yml"
    path.write_text(recipe)
    code = main(["merge", str(path), "--out", str(tmp_path / out), "--quiet"])
    assert code == 0
    return tmp_path / out


def _assert_equal_state(folder, state, atol=2e-6):
    with ModelFolder(folder) as merged:
        assert set(merged.tensor_names) <= set(state)
        for name in merged.tensor_names:
            torch.testing.assert_close(merged.get_tensor(name).float(), state[name].float(),
                                       atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("arch, kwargs", [
    ("llama", dict(target_modules=["q_proj", "v_proj"], use_rslora=True)),
    ("gpt2", dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
], ids=["llama-rslora", "gpt2-conv1d"])
def test_task_arithmetic_of_base_plus_adapter_equals_peft_merge(tmp_path, arch, kwargs):
    model = (tiny_llama if arch == "llama" else tiny_gpt2)(tmp_path / "base")
    reference = make_adapter(model, tmp_path / "adapter", **kwargs)
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    out = _merge(tmp_path, f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                           f"  - model: {base}+{adapter}\n    parameters: {{weight: 1.0}}\n")
    _assert_equal_state(out, reference)
    # the adapter folder alone takes the recipe's base_model
    out2 = _merge(tmp_path, f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                            f"  - model: {adapter}\n    parameters: {{weight: 1.0}}\n", out="out2")
    _assert_equal_state(out2, reference)


def test_two_adapters_merge_as_their_merged_models(tmp_path):
    model = tiny_llama(tmp_path / "base")
    ref_a = make_adapter(model, tmp_path / "a", seed=1, target_modules=["q_proj", "o_proj"])
    ref_b = make_adapter(model, tmp_path / "b", seed=2, target_modules=["v_proj", "o_proj"], r=2)
    save_merged(model, ref_a, tmp_path / "full_a")
    save_merged(model, ref_b, tmp_path / "full_b")
    base = tmp_path / "base"
    for method in ("ties", "linear"):
        params = "    parameters: {weight: 0.6, density: 0.5}\n"
        lora = _merge(tmp_path, f"merge_method: {method}\nbase_model: {base}\nmodels:\n"
                                f"  - model: {tmp_path / 'a'}\n{params}  - model: {base}+{tmp_path / 'b'}\n{params}",
                      out=f"lora_{method}")
        full = _merge(tmp_path, f"merge_method: {method}\nbase_model: {base}\nmodels:\n"
                                f"  - model: {tmp_path / 'full_a'}\n{params}  - model: {tmp_path / 'full_b'}\n{params}",
                      out=f"full_{method}")
        with ModelFolder(full) as f:
            _assert_equal_state(lora, {n: f.get_tensor(n) for n in f.tensor_names}, atol=1e-5)


def test_an_adapter_without_a_base_is_one_line(tmp_path, capsys):
    model = tiny_llama(tmp_path / "base")
    make_adapter(model, tmp_path / "adapter", target_modules=["q_proj"])
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {tmp_path / 'adapter'}\n"
                      f"  - model: {tmp_path / 'base'}\n")
    capsys.readouterr()
    assert main(["merge", str(recipe), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "models[0].model" in err and "needs a base" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_an_adapter_alone_takes_its_base_model_name_or_path_when_local(tmp_path):
    import json

    model = tiny_llama(tmp_path / "base")
    reference = make_adapter(model, tmp_path / "adapter", target_modules=["q_proj"])
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(tmp_path / "base")
    config_path.write_text(json.dumps(config))
    out = _merge(tmp_path, f"merge_method: linear\nmodels:\n  - model: {tmp_path / 'adapter'}\n"
                           "    parameters: {weight: 1.0}\n")
    _assert_equal_state(out, reference)
