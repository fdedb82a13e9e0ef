"""A user's own base, two LoRA adapters and a JSONL file, through the pages: the Models page
shows the adapter and registers the eval set; the merge lab and the compression lab score on
the file (held-out half); without an eval set they say what to do instead of scoring zoo tasks."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from tests.lora.peft_builders import user_folder

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def user_models(tmp_path, monkeypatch, quick_zoo):
    mine = user_folder(quick_zoo, tmp_path / "mine", 30)
    monkeypatch.setenv("DELTA_WORKBENCH_MODEL_ROOTS", str(mine))
    monkeypatch.chdir(ROOT)
    return mine


def _app(state: dict | None = None) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=180)
    for key, value in (state or {}).items():
        at.session_state[key] = value
    return at


def test_models_page_shows_an_adapter_and_registers_an_eval_set(user_models):
    at = _app()
    at.switch_page("pages/models.py").run()
    at.text_input(key="inspect_path").input(str(user_models / "adapter_a")).run()
    assert not at.exception
    assert any("PEFT LoRA adapter" in m.value for m in at.markdown)
    at.text_input(key="eval_set_path").input(str(user_models / "qa.jsonl")).run()
    assert any("30 lines" in m.value for m in at.markdown)
    at.button(key="add_eval_set").click().run()
    assert at.session_state["eval_sets"] == [str((user_models / "qa.jsonl").resolve())]
    # a file outside the roots is refused with a message
    at.text_input(key="eval_set_path").input("/etc/passwd").run()
    assert any("outside the allowed roots" in e.value for e in at.error)


@pytest.mark.parametrize("page", ["pages/merge_lab.py", "pages/compression_lab.py"])
def test_labs_score_the_users_models_on_their_file(user_models, page):
    selection = {"base": str(user_models / "base"),
                 "finetunes": [str(user_models / "adapter_a"), str(user_models / "adapter_b")]}
    at = _app({"selection": selection})
    at.switch_page(page).run()
    assert not at.exception and not at.error
    assert any("register an eval set" in i.value for i in at.info)

    at = _app({"selection": selection, "eval_sets": [str(user_models / "qa.jsonl")]})
    at.switch_page(page).run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert not any("register an eval set" in i.value for i in at.info)


@pytest.mark.parametrize("page", ["pages/spectra.py", "pages/similarity.py", "pages/clusters.py"])
def test_analysis_pages_take_lora_adapters(user_models, page):
    selection = {"base": str(user_models / "base"),
                 "finetunes": [str(user_models / "adapter_a"), str(user_models / "adapter_b")]}
    at = _app({"selection": selection})
    at.switch_page(page).run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
