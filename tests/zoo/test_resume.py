"""An interrupted zoo build (process killed hard, or failing) leaves the families it published
as a valid partial zoo and resumes: finished models are kept, the rest is trained, and the zoo
equals an uninterrupted build of the same seed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine.errors import ExportError
from engine.io import ModelFolder
from engine.zoo import build_zoo, load_manifest
from engine.zoo.plan import zoo_plan

ROOT = Path(__file__).resolve().parents[2]


def _assert_same_zoo(out, reference_dir, reference_manifest):
    """Every model of ``out`` equals the uninterrupted build's, tensor for tensor."""
    manifest = load_manifest(out)
    reference = {m["path"]: m for m in reference_manifest["models"]}
    assert [m["path"] for m in manifest["models"]] == list(reference)
    assert manifest["reference_merge"] == reference_manifest["reference_merge"]
    for entry in manifest["models"]:
        assert entry["accuracy"] == reference[entry["path"]]["accuracy"], entry["path"]
        with ModelFolder(out / entry["path"]) as got, \
                ModelFolder(Path(reference_dir) / entry["path"]) as want:
            assert got.tensor_names == want.tensor_names
            for name in want.tensor_names:
                assert torch.equal(got.get_tensor(name), want.get_tensor(name)), \
                    (entry["path"], name)


def _family(family):
    return [p.path for p in zoo_plan(quick=True) if p.family == family]


def test_killed_build_resumes_to_the_same_zoo(tmp_path, monkeypatch, quick_zoo,
                                              quick_zoo_manifest):
    """Killed hard after the small family is published and large/base is finished: the zoo is
    a valid partial one listing the small family only, the start-up sweep of a resuming command
    keeps the staging folder, and the resumed build keeps both and equals the reference."""
    from engine.io.staging import sweep_all_staging

    out = tmp_path / "zoo"
    threads = str(quick_zoo_manifest["torch_threads"])
    home = tmp_path / "home"
    monkeypatch.setenv("DELTA_WORKBENCH_HOME", str(home))
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", DELTA_WORKBENCH_HOME=str(home))
    child = subprocess.Popen(
        [sys.executable, "-m", "engine", "zoo", "build", "--quick", "--out", str(out),
         "--threads", threads], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while not list(tmp_path.glob(".zoo.staging-*/large/base/delta_workbench_manifest.json")):
            assert child.poll() is None, "the build ended before it could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # no cleanup runs: the staging folder stays
        child.wait()
    partial = load_manifest(out)
    assert partial["complete"] is False
    assert [m["path"] for m in partial["models"]] == _family("small")
    assert partial["pending"] == [p for p in (m["path"] for m in quick_zoo_manifest["models"])
                                  if not p.startswith("small/")]
    assert sorted(os.listdir(out)) == ["small", "tokenizer", "zoo.json"]
    assert sweep_all_staging(keep_for=[out]) == []  # what `zoo build --resume` keeps
    assert len(list(tmp_path.glob(".zoo.staging-*"))) == 1
    torch.set_num_threads(int(threads))
    build_zoo(out, quick=True, seed=0, resume=True)
    manifest = load_manifest(out)
    assert manifest["complete"] is True and manifest["pending"] == []
    assert manifest["resumed_models"] == [*_family("small"), "large/base"]
    assert [p.name for p in tmp_path.iterdir() if "staging" in p.name] == []
    _assert_same_zoo(out, quick_zoo, quick_zoo_manifest)


class _Stop(Exception):
    """The failure injected into a build."""


def test_build_interrupted_after_the_first_family(tmp_path, monkeypatch, quick_zoo,
                                                  quick_zoo_manifest):
    """A build that fails right after publishing the small family leaves a valid partial zoo
    listing exactly the small family, the pages work on it, a fresh build refuses it; a resumed
    build that fails between moving the large family in and rewriting zoo.json leaves the old
    manifest whole; resuming again completes the zoo, equal to an uninterrupted build."""
    from engine.zoo import build as zoo_build

    out = tmp_path / "zoo"
    torch.set_num_threads(int(quick_zoo_manifest["torch_threads"]))

    def stop_after_small(fraction, message):
        if message.startswith("published small"):
            raise _Stop

    with pytest.raises(_Stop):
        build_zoo(out, quick=True, seed=0, progress=stop_after_small)
    partial = load_manifest(out)
    assert partial["complete"] is False and partial["published_after_seconds"].keys() == {"small"}
    assert [m["path"] for m in partial["models"]] == _family("small")
    assert partial["pending"] == [*_family("large"), *_family("safety"), *_family("mllm")]
    assert sorted(os.listdir(out)) == ["small", "tokenizer", "zoo.json"]
    assert [p.name for p in tmp_path.iterdir() if "staging" in p.name] == []
    reference = {m["path"]: m for m in quick_zoo_manifest["models"]}
    for entry in partial["models"]:
        assert entry["accuracy"] == reference[entry["path"]]["accuracy"]
    _pages_render_on_the_partial_zoo(out, tmp_path, monkeypatch)

    before = (out / "zoo.json").read_bytes()
    with pytest.raises(ExportError, match="--resume"):
        build_zoo(out, quick=True, seed=0)
    with pytest.raises(ExportError, match="same settings"):
        build_zoo(out, quick=True, seed=1, resume=True)
    assert (out / "zoo.json").read_bytes() == before

    real_write = zoo_build._write_manifest

    def fail_after_large_moved_in(folder, manifest):
        if folder == out and (out / "large").is_dir():
            raise _Stop
        real_write(folder, manifest)

    monkeypatch.setattr(zoo_build, "_write_manifest", fail_after_large_moved_in)
    with pytest.raises(_Stop):
        build_zoo(out, quick=True, seed=0, resume=True)
    monkeypatch.setattr(zoo_build, "_write_manifest", real_write)
    assert (out / "zoo.json").read_bytes() == before  # never torn, never half-updated
    assert sorted(os.listdir(out)) == ["large", "small", "tokenizer", "zoo.json"]

    build_zoo(out, quick=True, seed=0, resume=True)
    manifest = load_manifest(out)
    assert manifest["complete"] is True and manifest["pending"] == []
    assert manifest["resumed_models"] == [*_family("small"), *_family("large")]
    _assert_same_zoo(out, quick_zoo, quick_zoo_manifest)
    assert build_zoo(out, quick=True, seed=0, resume=True) == out  # complete: left as it is
    assert load_manifest(out)["models"] == manifest["models"]


def _pages_render_on_the_partial_zoo(zoo, tmp_path, monkeypatch):
    """The Models page lists the published models and what is still training; the analysis,
    merge and compression pages work with the models that exist."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("DELTA_WORKBENCH_HOME", str(tmp_path / "app-home"))
    monkeypatch.setenv("DELTA_WORKBENCH_ZOO", str(zoo))
    monkeypatch.chdir(ROOT)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=180).run()
    assert not at.exception
    assert list(at.dataframe[0].value["path"]) == _family("small")
    training = len(zoo_plan(quick=True)) - len(_family("small"))
    assert any(f"Still training: {training} model(s)" in i.value for i in at.info)
    assert any("Continue the zoo build" in b.label for b in at.button)
    assert at.session_state["selection"]["base"] == str(zoo / "small" / "base")
    for page in ("pages/spectra.py", "pages/merge_lab.py", "pages/compression_lab.py",
                 "pages/incompatibility.py"):
        at.switch_page(page).run()
        assert not at.exception, (page, at.exception)


def test_resume_ignores_a_finished_model_of_another_plan(tmp_path, quick_zoo):
    """A staging folder whose model was trained with other settings is retrained, not kept."""
    from engine.zoo.build import _reusable

    item = zoo_plan(quick=True)[0]
    folder = tmp_path / item.path
    folder.mkdir(parents=True)
    stored = json.loads((Path(quick_zoo) / item.path / "delta_workbench_manifest.json").read_text())
    entry = dict(stored["zoo"])
    expected = {k: entry[k] for k in ("path", "family", "role", "task", "parent", "seed",
                                      "trained_on", "steps", "lr", "batch_size", "arch")}
    (folder / "delta_workbench_manifest.json").write_text(json.dumps({"zoo": entry}))
    assert _reusable(tmp_path, item, expected) == entry
    (folder / "delta_workbench_manifest.json").write_text(
        json.dumps({"zoo": dict(entry, steps=entry["steps"] + 1)}))
    assert _reusable(tmp_path, item, expected) is None
