"""Shared fixtures.

``quick_zoo``: the ``--quick`` demo zoo, built once per test session into a temporary
folder (seed 0) and shared by every test that asks for it. It is built per session, never
reused across sessions, so a stale or tampered zoo can never leak into a run. Tests must
treat it as read-only (write outputs under their own ``tmp_path``).

Opt-in shortcut for slow machines: ``DELTA_WORKBENCH_TEST_ZOO=DIR`` uses a quick zoo you
built yourself (``python -m engine zoo build --quick --out DIR``); it must say quick and seed 0.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def quick_zoo(tmp_path_factory):
    """Path of a freshly built quick zoo (``zoo.json`` at its root)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from pathlib import Path

    from engine.zoo import build_zoo, load_manifest

    prebuilt = os.environ.get("DELTA_WORKBENCH_TEST_ZOO")
    if prebuilt:
        manifest = load_manifest(prebuilt)
        if manifest.get("quick") is not True or manifest.get("seed") != 0:
            pytest.fail("DELTA_WORKBENCH_TEST_ZOO must be a quick zoo built with seed 0")
        return Path(prebuilt).absolute()
    return build_zoo(tmp_path_factory.mktemp("zoo") / "quick", quick=True, seed=0)


@pytest.fixture(scope="session")
def quick_zoo_manifest(quick_zoo):
    from engine.zoo import load_manifest

    return load_manifest(quick_zoo)
