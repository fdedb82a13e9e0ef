"""The what-if session takes LoRA adapters as fine-tunes and scores the user's own files:
a weight-1 linear 'merge' of one adapter scores as PEFT's merged model does."""

from __future__ import annotations

import json

import pytest

from engine.errors import ParameterError
from engine.evaluate.loading import load_model_folder
from engine.evaluate.own_data import read_jsonl, read_text, score_sets
from engine.evaluate.tasks import TASKS, heldout_examples
from engine.merge.whatif import WhatIfSession
from tests.lora.peft_builders import make_adapter


@pytest.fixture(scope="module")
def zoo_adapter(quick_zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("wi")
    model, tokenizer = load_model_folder(quick_zoo / "small" / "base")
    merged = make_adapter(model, root / "adapter", target_modules=["q_proj", "v_proj"], r=2,
                          lora_alpha=1)
    examples = heldout_examples(TASKS["upper"], 40) + heldout_examples(TASKS["reverse"], 40)
    (root / "mine.jsonl").write_text("\n".join(json.dumps({"prompt": p, "answer": a})
                                               for p, a in examples) + "\n")
    (root / "docs.txt").write_text("\n".join(f"some generic text number {i}" for i in range(30)) + "\n")
    return root, model, tokenizer, merged


def test_whatif_of_one_adapter_scores_as_the_merged_model(quick_zoo, zoo_adapter):
    root, model, tokenizer, merged = zoo_adapter
    files = [root / "mine.jsonl", root / "docs.txt"]
    session = WhatIfSession(quick_zoo / "small" / "base", [root / "adapter"], tasks=[],
                            eval_files=files)
    result = session.evaluate("linear", [{"weight": 1.0}])
    model.load_state_dict(merged)
    want = score_sets(model, tokenizer, [read_jsonl(files[0]).split("heldout"),
                                         read_text(files[1]).split("heldout")])
    assert result["tasks"] == want["tasks"]
    assert result["perplexity_sets"]["docs"] == pytest.approx(want["perplexity"]["docs"], rel=1e-5)
    assert 0 < result["tasks"]["mine"]["n"] < 80  # the held-out half only
    # beside the zoo tasks too
    both = WhatIfSession(quick_zoo / "small" / "base", [root / "adapter"], tasks=["upper"],
                         n_per_task=8, eval_files=files[:1]).evaluate("linear", [{"weight": 1.0}])
    assert set(both["tasks"]) == {"upper", "mine"}


def test_an_eval_file_named_like_a_zoo_task_is_refused(quick_zoo, zoo_adapter, tmp_path):
    root, *_ = zoo_adapter
    clash = tmp_path / "upper.jsonl"
    clash.write_text((root / "mine.jsonl").read_text())
    with pytest.raises(ParameterError, match="also a zoo task"):
        WhatIfSession(quick_zoo / "small" / "base", [root / "adapter"], eval_files=[clash])
    with pytest.raises(ParameterError, match="nothing to score"):
        WhatIfSession(quick_zoo / "small" / "base", [root / "adapter"], tasks=[])


def test_eval_of_an_adapter_over_its_base_equals_eval_of_the_merged_model(quick_zoo, zoo_adapter,
                                                                         tmp_path, capsys):
    from engine.__main__ import main
    from engine.evaluate.loading import evaluate_folder
    from tests.lora.peft_builders import save_merged

    root, model, tokenizer, merged = zoo_adapter
    save_merged(model, merged, tmp_path / "merged")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        src = quick_zoo / "small" / "base" / name
        if src.exists():
            (tmp_path / "merged" / name).write_bytes(src.read_bytes())
    capsys.readouterr()
    code = main(["eval", str(root / "adapter"), "--base", str(quick_zoo / "small" / "base"),
                 "--data", str(root / "mine.jsonl"), "--json"])
    ours = json.loads(capsys.readouterr().out)
    assert code == 0
    want = evaluate_folder(tmp_path / "merged", tasks=[], eval_sets=[read_jsonl(root / "mine.jsonl")])
    assert ours["tasks"] == want["tasks"]
    assert main(["eval", str(root / "adapter"), "--data", str(root / "mine.jsonl")]) == 2
    assert "give the base model" in capsys.readouterr().err
