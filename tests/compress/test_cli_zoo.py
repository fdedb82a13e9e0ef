"""Command line round trip on the quick zoo: compress, decompress, load in transformers;
one-line refusals for a wrong base and a corrupt artifact; serving and calibration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.compress import DeltaServer, compress, rebuild_state_dict
from engine.io import ModelFolder

REPO = Path(__file__).resolve().parents[2]


def cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "engine", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def zoo(quick_zoo):
    return Path(quick_zoo)


def small_fine_tunes(zoo: Path) -> list[str]:
    from engine.zoo import load_manifest

    return [m["path"] for m in load_manifest(zoo)["models"]
            if m["family"] == "small" and m["role"] == "finetune"]


@pytest.mark.parametrize("method,which", [("delta_dct", 0), ("impart", 1), ("bitdelta", 2)])
def test_cli_round_trip_loads_in_transformers(zoo, tmp_path, method, which):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, ft = zoo / "small" / "base", zoo / small_fine_tunes(zoo)[which]
    art, out = tmp_path / "art", tmp_path / "model"
    done = cli("compress", "--base", base, "--finetuned", ft, "--method", method, "--ratio", 16,
               "--out", art, "--json", "--quiet")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert abs(summary["ratio"] / 16 - 1) <= 0.10
    done = cli("decompress", art, "--base", base, "--out", out, "--quiet")
    assert done.returncode == 0, done.stderr
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    ids = torch.tensor([tokenizer("rev:abc=")["input_ids"]])
    assert torch.isfinite(model(ids).logits).all()
    assert (out / "tokenizer.json").read_bytes() == (ft / "tokenizer.json").read_bytes()
    assert json.loads((out / "config.json").read_text()) == json.loads((ft / "config.json").read_text())
    # the written folder holds exactly the in-memory rebuild
    with ModelFolder(out) as folder:
        rebuilt = rebuild_state_dict(art, base, device="cpu")
        for name in folder.tensor_names:
            assert torch.equal(folder.get_tensor(name), rebuilt[name].to(folder.info(name).dtype))


def test_cli_refuses_wrong_base_and_corrupt_artifact_in_one_line(zoo, tmp_path):
    art = tmp_path / "art"
    tune = zoo / small_fine_tunes(zoo)[0]
    assert cli("compress", "--base", zoo / "small/base", "--finetuned", tune,
               "--method", "svd", "--ratio", 8, "--out", art, "--quiet").returncode == 0
    for wrong in (zoo / "large/base", zoo / "safety/aligned"):
        done = cli("decompress", art, "--base", wrong, "--out", tmp_path / "out", "--quiet")
        assert done.returncode == 2
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "wrong base" in lines[0] and "Traceback" not in done.stderr
    data = bytearray((art / "delta.safetensors").read_bytes())
    data[-1] ^= 1
    (art / "delta.safetensors").write_bytes(bytes(data))
    done = cli("decompress", art, "--base", zoo / "small/base", "--out", tmp_path / "out", "--quiet")
    assert done.returncode == 2 and "sha256" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    done = cli("compress", "--base", zoo / "small/base", "--finetuned", tune,
               "--method", "svd", "--param", "rank=oops", "--out", tmp_path / "x", "--quiet")
    assert done.returncode == 2 and "rank" in done.stderr


def test_delta_server_switches_fine_tunes(zoo, tmp_path):
    from engine.evaluate.loading import model_from_config

    base = zoo / "small" / "base"
    arts = {}
    for path, method in zip(small_fine_tunes(zoo)[:2], ("delta_dct", "svd")):
        task = path.split("/")[-1]
        arts[task] = tmp_path / task
        compress(base, zoo / path, arts[task], method, ratio=16, device="cpu")
    server = DeltaServer(base, device="cpu")
    for task, art in arts.items():
        server.add(task, art)
    memory = server.memory()
    assert memory["base_bytes"] == sum(t.numel() * 4 for t in server.base.values())
    assert all(0 < b < memory["base_bytes"] / 8 for b in memory["delta_bytes"].values())
    with ModelFolder(base) as folder:
        model = model_from_config(folder.config)
    for task, art in arts.items():
        expected = rebuild_state_dict(art, base, device="cpu")
        state = server.materialize(task)
        assert all(torch.equal(state[n], expected[n]) for n in expected)
        server.materialize(task, into=model)
        assert all(torch.equal(model.state_dict()[n], expected[n]) for n in expected)
        assert server.last_switch_s is not None
    with pytest.raises(Exception, match="no fine-tune named"):
        server.materialize("nope")


def test_calibrated_methods_learn_their_scalars(zoo, tmp_path):
    from engine.zoo import load_manifest

    entry = next(m for m in load_manifest(zoo)["models"] if m["path"] == small_fine_tunes(zoo)[0])
    base, ft = zoo / "small" / "base", zoo / entry["path"]
    small = {"n_prompts": 8, "steps": 8}
    result = compress(base, ft, tmp_path / "dbms", "dbms", ratio=16,
                      params={"inner": "svd", **small}, device="cpu")
    params = json.loads((tmp_path / "dbms" / "manifest.json").read_text())["params"]
    assert {"alpha", "scale"} <= set(params) and (params["alpha"], params["scale"]) != (0.0, 1.0)
    report = result.calibration["dbms"]
    assert result.calibration["tasks"] == [entry["task"]]  # the fine-tune's own zoo task
    assert report["kl_after"] <= report["kl_before"]
    assert abs(result.ratio / 16 - 1) <= 0.10
    result = compress(base, ft, tmp_path / "bd", "bitdelta", ratio=16,  # the paper's default
                      params={"steps": 8}, device="cpu")
    report = result.calibration["distill"]
    assert report["objective"] == "logit_mse" and report["mse_after"] <= report["mse_before"]
    assert result.calibration["text"] == "zoo pretraining text" and "warning" not in result.calibration
    compress(base, ft, tmp_path / "bd0", "bitdelta", ratio=16, params={"distill": False},
             device="cpu")
    # distilled scales replace the fp16 scales in place: same sections, same sizes
    assert ((tmp_path / "bd0" / "delta.safetensors").stat().st_size
            == (tmp_path / "bd" / "delta.safetensors").stat().st_size)
    a = rebuild_state_dict(tmp_path / "bd", base, device="cpu")
    b = rebuild_state_dict(tmp_path / "bd0", base, device="cpu")
    assert any(not torch.equal(a[n], b[n]) for n in a if a[n].ndim == 2)
