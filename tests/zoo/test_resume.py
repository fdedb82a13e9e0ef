"""An interrupted zoo build (process killed hard) resumes: finished models are kept, the rest
is trained, and the zoo equals an uninterrupted build of the same seed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from engine.io import ModelFolder
from engine.zoo import build_zoo, load_manifest

ROOT = Path(__file__).resolve().parents[2]


def test_killed_build_resumes_to_the_same_zoo(tmp_path, quick_zoo, quick_zoo_manifest):
    out = tmp_path / "zoo"
    threads = str(quick_zoo_manifest["torch_threads"])
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    child = subprocess.Popen(
        [sys.executable, "-m", "engine", "zoo", "build", "--quick", "--out", str(out),
         "--threads", threads], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not list(tmp_path.glob(".zoo.staging-*/small/base/delta_workbench_manifest.json")):
            assert child.poll() is None, "the build ended before it could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # no cleanup runs: the staging folder stays
        child.wait()
    assert not out.exists()
    torch.set_num_threads(int(threads))
    build_zoo(out, quick=True, seed=0, resume=True)
    manifest = load_manifest(out)
    assert "small/base" in manifest["resumed_models"]
    assert [p.name for p in tmp_path.iterdir() if "staging" in p.name] == []
    reference = {m["path"]: m for m in quick_zoo_manifest["models"]}
    for entry in manifest["models"]:
        assert entry["accuracy"] == reference[entry["path"]]["accuracy"], entry["path"]
        with ModelFolder(out / entry["path"]) as got, \
                ModelFolder(Path(quick_zoo) / entry["path"]) as want:
            for name in want.tensor_names:
                assert torch.equal(got.get_tensor(name), want.get_tensor(name)), \
                    (entry["path"], name)


def test_resume_ignores_a_finished_model_of_another_plan(tmp_path, quick_zoo):
    """A staging folder whose model was trained with other settings is retrained, not kept."""
    from engine.zoo.build import _reusable
    from engine.zoo.plan import zoo_plan

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
