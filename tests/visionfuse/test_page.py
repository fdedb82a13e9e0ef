"""Vision fusion page under AppTest: with the zoo's text-only models it asks for members; with
two LLaVA members it shows each member, the concatenation without the merge and the fused
model, per task, with sample images; a text-only member gives a message, not a traceback."""

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def page(members, monkeypatch, tmp_path):
    monkeypatch.setenv("DELTA_WORKBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DELTA_WORKBENCH_ZOO", str(members["base"].parents[1]))
    monkeypatch.setenv("DELTA_WORKBENCH_MODEL_ROOTS", str(members["top"].parent))
    monkeypatch.chdir(ROOT)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.switch_page("pages/vision_fusion.py").run()
    assert not at.exception
    return at


def test_members_concatenation_and_fused_are_shown(page, members):
    if not page.text_input(key="vf_m1").value:  # a zoo without the mllm family
        assert page.info
        page.text_input(key="vf_m1").set_value(str(members["top"]))
        page.text_input(key="vf_m2").set_value(str(members["bottom"]))
        page.slider(key="vf_n").set_value(8)
        page.run()
    assert not page.exception and not page.error
    labels = [m.label for m in page.metric]
    assert labels == ["top alone", "bottom alone", "concatenation, top's LM unmerged",
                      "fused (task_arithmetic)"]
    assert len(page.get("plotly_chart")) == 1 + 4  # the bars, four sample images


def test_a_text_only_member_is_a_message(page, members):
    page.text_input(key="vf_m1").set_value(str(members["top"]))
    page.text_input(key="vf_m2").set_value(str(members["text"]))
    page.run()
    assert not page.exception
    assert page.error and "text-only" in page.error[0].value
