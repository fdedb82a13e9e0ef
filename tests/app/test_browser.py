"""A real browser over the served app: every page renders in headless Chromium (Debian's
``chromium`` driven by playwright) with no exception element, a screenshot of each, and a
what-if change in the merge lab redraws its chart."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
PAGES = ["", "spectra", "similarity", "clusters", "incompatibility", "merge_lab", "jobs", "export"]

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists() or shutil.which("chromium") is None,
                                reason="needs Debian's chromium (.ci/run installs it)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, quick_zoo):
    proc, url = _serve(tmp_path_factory.mktemp("browser-home"), quick_zoo)
    yield url
    proc.terminate()
    proc.wait(timeout=20)


def _serve(home: Path, zoo: Path):
    """Start ``streamlit run app.py`` on a free loopback port; (process, url) once healthy."""
    port = _free_port()
    env = dict(os.environ, DELTA_WORKBENCH_HOME=str(home), DELTA_WORKBENCH_ZOO=str(zoo),
               DELTA_WORKBENCH_CACHE=str(home / "metrics.duckdb"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
         "--server.headless", "true"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as answer:
                if answer.read() == b"ok":
                    break
        except OSError:
            pass
        assert proc.poll() is None and time.time() < deadline, "the app did not start"
        time.sleep(0.5)
    return proc, url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield chromium
        chromium.close()


def _settle(page, timeout_ms: int = 180_000) -> None:
    """Wait until the script run has finished (the app shows no running indicator)."""
    page.wait_for_selector('[data-testid="stMain"] h1', timeout=timeout_ms)  # every page has a title
    page.wait_for_function(
        """() => !document.querySelector('[data-testid="stStatusWidget"]')
                 && document.querySelector('[data-testid="stMain"]')""", timeout=timeout_ms)
    page.wait_for_timeout(500)


def test_every_page_renders_without_an_exception(app_url, browser, tmp_path):
    shots = Path(os.environ.get("DELTA_WORKBENCH_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    for name in PAGES:
        page.goto(f"{app_url}/{name}")
        _settle(page)
        assert page.locator('[data-testid="stException"]').count() == 0, name
        assert page.locator('[data-testid="stMain"]').inner_text().strip(), name
        page.screenshot(path=str(shots / f"{name or 'models'}.png"), full_page=True)
        assert (shots / f"{name or 'models'}.png").stat().st_size > 0
    page.close()


def test_merge_lab_change_redraws_the_chart(app_url, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{app_url}/merge_lab")
    _settle(page)
    trace = "() => document.querySelector('.js-plotly-plot').data[0].name"
    page.wait_for_function("() => document.querySelector('.js-plotly-plot')", timeout=120_000)
    assert page.evaluate(trace) == "merged (ties)"
    select = page.locator('[data-testid="stSelectbox"]').filter(has_text="Method").first
    select.click()
    page.get_by_role("option", name="linear", exact=True).click()
    page.wait_for_function(
        "() => document.querySelector('.js-plotly-plot')"
        " && document.querySelector('.js-plotly-plot').data[0].name === 'merged (linear)'",
        timeout=120_000)
    _settle(page)
    assert page.locator('[data-testid="stException"]').count() == 0
    page.close()


def test_deep_link_on_a_fresh_server_gets_the_app_navigation(browser, tmp_path, quick_zoo):
    """A bookmark opened as the server's very first request still runs under app.py's
    navigation (Streamlit would otherwise list every file of pages/ as a page)."""
    proc, url = _serve(tmp_path / "home", quick_zoo)
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{url}/spectra")
        _settle(page)
        page.wait_for_function("() => document.querySelector('[data-testid=\"stSidebarNav\"]')"
                               " && document.querySelector('[data-testid=\"stSidebarNav\"]')"
                               ".innerText.includes('Merge lab')", timeout=120_000)
        nav = page.locator('[data-testid="stSidebarNav"]').inner_text()
        assert "shared" not in nav and "forms" not in nav
        assert page.locator('[data-testid="stMain"] h1').first.inner_text() == "Delta spectra"
        assert page.locator('[data-testid="stException"]').count() == 0
        page.close()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
