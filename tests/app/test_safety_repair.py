"""Safety repair page under AppTest: repairs the zoo's safety pair with the default method,
shows refusal and task accuracy, the kept share per matrix, the knob sweep; other methods and a
bad path give a message, not a traceback."""

from __future__ import annotations

import pytest


@pytest.fixture
def page(open_page):
    return open_page("pages/safety_repair.py")


def test_the_page_repairs_the_zoo_pair_and_sweeps_the_knob(page, tmp_path):
    assert not page.error
    labels = [m.label for m in page.metric]
    assert "Refusal (repaired)" in labels and "reverse (repaired)" in labels
    assert len(page.get("plotly_chart")) == 2  # scores, kept share per matrix
    repairs = list((tmp_path / "home" / "repairs").iterdir())
    assert len(repairs) == 1 and (repairs[0] / "model" / "delta_workbench_manifest.json").is_file()
    page.button(key="sr_sweep").click().run()
    assert not page.exception and not page.error
    assert len(page.get("plotly_chart")) == 3
    assert len(list((repairs[0] / "sweep").iterdir())) == 4  # paper budget: four values of s


def test_irr_with_the_zoo_unaligned_model_and_a_bad_path(page):
    page.selectbox(key="sr_method").set_value("irr").run()
    assert not page.exception and not page.error
    page.text_input(key="sr_finetuned").set_value("/etc").run()
    assert not page.exception
    assert page.error and "Cannot repair" in page.error[0].value
