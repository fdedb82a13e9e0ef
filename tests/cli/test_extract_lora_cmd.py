"""``python -m engine extract-lora``: writes a PEFT adapter with a model card; bad options are
one line, exit 2, nothing written."""

from __future__ import annotations

import json

import pytest
import yaml

from engine.__main__ import main
from tests.lora.peft_builders import tiny_llama
from tests.lora.test_extract import _finetune


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    model = tiny_llama(root / "base")
    _finetune(model, root / "ft")
    return root


def test_extract_lora_command_writes_an_adapter_with_a_card(pair, tmp_path, capsys):
    out = tmp_path / "lora"
    code = main(["extract-lora", "--base", str(pair / "base"), "--finetuned", str(pair / "ft"),
                 "--rank", "2", "--out", str(out), "--json", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["ranks"] == [2] and summary["modules"] == 14  # 7 linear layers x 2 blocks
    assert "warning: left out of the adapter" in captured.err
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "peft" and "extract-lora" in front["tags"]
    assert front["delta_workbench"]["parameters"]["rank"] == 2
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2


@pytest.mark.parametrize("extra, needle", [
    (["--rank", "0"], "--rank"),
    (["--sv-cutoff", "1.5"], "--sv-cutoff"),
    (["--save-module", "nope"], "'nope' names no module"),
])
def test_bad_options_are_one_line(pair, tmp_path, capsys, extra, needle):
    out = tmp_path / "lora"
    code = main(["extract-lora", "--base", str(pair / "base"), "--finetuned", str(pair / "ft"),
                 "--out", str(out), "--quiet", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and "\n" not in err and err.startswith("error: ")
    assert not out.exists() and list(tmp_path.iterdir()) == []
