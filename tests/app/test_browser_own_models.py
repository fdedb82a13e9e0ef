"""A real browser, a user's own models: a folder with a base, two PEFT LoRA adapters and a JSONL
file, opened through the Models page, gives delta spectra, a what-if merge scored on the file
(its held-out half), and an exported merge with a model card."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import yaml

from tests.app.test_browser import CHROMIUM, _serve, _settle, browser  # noqa: F401 (fixture)
from tests.lora.peft_builders import user_folder

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists() or shutil.which("chromium") is None,
                                reason="needs Debian's chromium (.ci/run installs it)")


@pytest.fixture
def served(tmp_path, quick_zoo, monkeypatch):
    mine = user_folder(quick_zoo, tmp_path / "mine", 24)
    monkeypatch.setenv("DELTA_WORKBENCH_MODEL_ROOTS", str(mine))
    home = tmp_path / "home"
    # no demo zoo: the user's own folder is all there is
    proc, url = _serve(home, tmp_path / "no-zoo")
    yield url, mine, home
    proc.terminate()
    proc.wait(timeout=20)


def _type(page, label: str, text: str) -> None:
    field = page.get_by_label(label, exact=True)
    field.fill(text)
    field.press("Enter")
    _settle(page)


def _wait_text(page, text: str, timeout_ms: int = 180_000) -> None:
    """Wait for ``text`` in the main area (a click's rerun may start after _settle returned)."""
    page.wait_for_function(f"() => document.querySelector('[data-testid=\"stMain\"]')"
                           f".innerText.includes({json.dumps(text)})", timeout=timeout_ms)


def _use_selection(page, base: str, finetunes: tuple[str, ...], tries: int = 3) -> None:
    """Pick the base and fine-tunes in the selection form and submit it.

    _settle can return before a rerun that an earlier click started has begun (Streamlit shows
    its running indicator only after a delay); a rerun that lands between picking and
    submitting redraws the form and drops the picks, and the submit then selects nothing. So
    the picks are checked on the page before the submit, and a submit that shows no verdict
    within a minute is tried again (a real defect fails every try)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    expected = f"Compatible: {base} + {len(finetunes)} fine-tune(s)"
    for attempt in range(tries):
        box = page.locator('[data-testid="stSelectbox"]').filter(has_text="Base model")
        box.click()
        page.get_by_role("option", name=base, exact=True).click()
        multi = page.locator('[data-testid="stMultiSelect"]').filter(has_text="Fine-tunes")
        for name in finetunes:
            if multi.get_by_text(name, exact=True).count():
                continue  # still picked from an earlier try
            multi.click()
            page.get_by_role("option", name=name, exact=True).click()
            page.keyboard.press("Escape")
        page.wait_for_timeout(300)
        if box.locator("input").input_value() != base or any(
                multi.get_by_text(name, exact=True).count() == 0 for name in finetunes):
            _settle(page)
            continue  # a rerun redrew the form under the picks: pick again
        page.get_by_role("button", name="Use this selection").click()
        try:
            _wait_text(page, expected, 60_000 if attempt + 1 < tries else 180_000)
            return
        except PlaywrightTimeoutError:
            if attempt + 1 == tries:
                raise
            _settle(page)
    raise AssertionError(f"the selection form never held {base} + {finetunes}")


def _nav(page, title: str) -> None:
    page.locator('[data-testid="stSidebarNav"]').get_by_text(title, exact=True).click()
    page.wait_for_function(f"() => [...document.querySelectorAll('[data-testid=\"stMain\"] h1')]"
                           f".some(h => h.innerText.trim() === {json.dumps(title)})", timeout=180_000)
    _settle(page)


def test_own_base_two_adapters_and_a_jsonl_file(served, browser):  # noqa: F811
    url, mine, home = served
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.goto(url)
    _settle(page)
    for name in ("base", "adapter_a", "adapter_b"):
        _type(page, "Model folder or LoRA adapter folder", str(mine / name))
        if name != "base":
            _wait_text(page, "PEFT LoRA adapter")
        page.get_by_role("button", name="Add to the choices above").click()
        page.wait_for_function("() => ![...document.querySelectorAll('button')].some("
                               "b => b.innerText.includes('Add to the choices above'))",
                               timeout=180_000)
        _settle(page)
    _use_selection(page, "base", ("adapter_a", "adapter_b"))
    _settle(page)
    _type(page, "Eval file (.jsonl or .txt)", str(mine / "qa.jsonl"))
    _wait_text(page, "24 lines")
    page.get_by_role("button", name="Register this eval set").click()
    _wait_text(page, "Remove")
    _settle(page)

    _nav(page, "Delta spectra")
    assert page.locator('[data-testid="stException"]').count() == 0
    page.wait_for_function("() => document.querySelector('.js-plotly-plot')", timeout=180_000)

    _nav(page, "Merge lab")
    page.wait_for_function("() => document.querySelector('.js-plotly-plot')", timeout=180_000)
    assert page.locator('[data-testid="stException"]').count() == 0
    tasks = page.evaluate("() => document.querySelector('.js-plotly-plot').data[0].x")
    assert tasks == ["qa"]  # scored on the user's file only: these are not zoo models

    out_field = page.get_by_label("Output folder name (under the export folder)", exact=True)
    out_field.fill("my-merge")
    page.get_by_role("button", name="Run the full merge as a job").click()
    _settle(page)
    card = home / "exports" / "my-merge" / "README.md"
    deadline = time.time() + 300
    while not card.exists():
        assert time.time() < deadline, "the merge job did not export"
        time.sleep(1)
    front = yaml.safe_load(card.read_text().split("---")[1])
    assert "delta-workbench" in front["tags"] and front["base_model"]
    assert page.locator('[data-testid="stException"]').count() == 0
    page.close()
