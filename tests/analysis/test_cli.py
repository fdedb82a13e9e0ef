"""``python -m engine analyze``: JSON shape, the cache flag, one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.__main__ import main
from tests.analysis.helpers import CONFIG, base_tensors, make_family
from tests.io.builders import write_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def family(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTA_WORKBENCH_CACHE", str(tmp_path / "cache" / "m.duckdb"))
    return make_family(tmp_path / "models", n_finetunes=2)


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_json_shape_and_cache(family, capsys, tmp_path):
    base_dir, ft_dirs, base, _ = family
    argv = ["analyze", "--base", str(base_dir), "--finetuned", str(ft_dirs[0]),
            "--finetuned", str(ft_dirs[1]), "--json", "--top-k", "4"]
    code, out, err = _run(capsys, *argv)
    assert code == 0
    result = json.loads(out)
    assert set(result) >= {"tensors", "pairs", "models", "cache", "base", "finetuned"}
    first = result["tensors"][0]
    for key in ("name", "shape", "fro_norm", "rel_norm", "top_singular_values", "effective_rank",
                "stable_rank", "energy_k_50", "energy_k_90", "energy_k_99", "sparsity", "kurtosis",
                "nan_count", "inf_count", "model"):
        assert key in first
    matrices = [t for t in result["tensors"] if t["top_singular_values"] is not None]
    assert matrices and all(len(t["top_singular_values"]) == 4 for t in matrices)
    assert len(result["tensors"]) == 2 * len(base)
    pair = result["pairs"][0]
    assert {"name", "a", "b", "cosine", "sign_conflict", "topk_jaccard", "principal_cosines"} <= set(pair)
    assert result["cache"]["status"] == "ok" and result["cache"]["hits"] == 0
    assert "analyze" in err or "/" in err  # a progress bar on stderr
    assert (tmp_path / "cache" / "m.duckdb").is_file()

    code, out, _ = _run(capsys, *argv)
    again = json.loads(out)
    assert again["cache"]["misses"] == 0 and again["tensors"] == result["tensors"]

    code, out, _ = _run(capsys, *argv, "--no-cache", "--quiet")
    fresh = json.loads(out)
    assert fresh["cache"]["status"] == "off" and fresh["cache"]["hits"] == 0
    assert fresh["tensors"] == result["tensors"]


def test_text_output(family, capsys):
    base_dir, ft_dirs, _, _ = family
    code, out, _ = _run(capsys, "analyze", "--base", str(base_dir), "--finetuned", str(ft_dirs[0]),
                        "--quiet", "--no-cache")
    assert code == 0 and "fro_norm" in out and "lm_head.weight" in out


def _bad_inputs(tmp_path, family):
    base_dir, ft_dirs, _, _ = family
    other = base_tensors()
    other["model.layers.0.mlp.up_proj.weight"] = torch.zeros(5, 16)
    write_model(tmp_path / "odd", other, config=dict(CONFIG))
    pickle_dir = tmp_path / "pickled"
    pickle_dir.mkdir()
    (pickle_dir / "config.json").write_text(json.dumps(CONFIG))
    (pickle_dir / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    b, f = str(base_dir), str(ft_dirs[0])
    return {
        "missing folder": (["--base", b, "--finetuned", str(tmp_path / "nope")], "not found"),
        "shape mismatch": (["--base", b, "--finetuned", str(tmp_path / "odd")], "mlp.up_proj"),
        "pickle": (["--base", b, "--finetuned", str(pickle_dir)], "pickle"),
        "top-k zero": (["--base", b, "--finetuned", f, "--top-k", "0"], "top_k"),
        "density": (["--base", b, "--finetuned", f, "--density", "1.5"], "density"),
        "device": (["--base", b, "--finetuned", f, "--device", "tpu9"], "device"),
    }


def test_bad_inputs_are_one_line_errors(family, tmp_path, capsys):
    for label, (args, needle) in _bad_inputs(tmp_path, family).items():
        code, out, err = _run(capsys, "analyze", "--quiet", "--json", *args)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2, label
        assert out == "", label
        assert len(lines) == 1 and lines[0].startswith("error: "), (label, err)
        assert needle in lines[0], (label, lines[0])


def test_real_process_prints_no_traceback(family, tmp_path):
    base_dir, _, _, _ = family
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "analyze", "--base", str(base_dir), "--finetuned",
         str(tmp_path / "absent"), "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: ") and str(tmp_path / "absent") in proc.stderr


def test_corrupt_cache_file_is_a_warning_not_an_error(family, tmp_path, capsys):
    base_dir, ft_dirs, _, _ = family
    db = tmp_path / "cache" / "m.duckdb"
    db.parent.mkdir(parents=True, exist_ok=True)
    db.write_bytes(b"\x00" * 8 + b"DUCK" + b"\x00garbage" * 500)  # a damaged database
    code, out, err = _run(capsys, "analyze", "--base", str(base_dir), "--finetuned", str(ft_dirs[0]),
                          "--json", "--quiet")
    assert code == 0
    result = json.loads(out)
    assert result["cache"]["status"] == "ok" and result["cache"]["written"] > 0
    assert "warning: " in err and "moved aside" in err
    assert len(list(db.parent.glob("m.duckdb.corrupt-*"))) == 1


def test_clusters_command_matches_the_engine_and_caches(family, capsys):
    """``clusters``: the JSON is analyze_clusters' result (same layers, same numbers); a second
    run reads every layer from the cache; the text view lists every matrix."""
    from engine.analysis import ClusterParams, analyze_clusters

    base_dir, ft_dirs, base, _ = family
    argv = ["clusters", "--base", str(base_dir), "--finetuned", str(ft_dirs[0]),
            "--finetuned", str(ft_dirs[1]), "--groups", "2", "--json", "--quiet"]
    code, out, _ = _run(capsys, *argv)
    assert code == 0
    result = json.loads(out)
    direct = analyze_clusters(base_dir, ft_dirs, ClusterParams(num_groups=2))
    assert [layer["name"] for layer in result["layers"]] == [layer["name"] for layer in direct["layers"]]
    assert result["layers"] == json.loads(json.dumps(direct["layers"]))
    assert result["cache"]["misses"] == len(result["layers"]) > 0
    code, out, _ = _run(capsys, *argv)
    assert json.loads(out)["cache"]["hits"] == len(result["layers"])
    code, out, _ = _run(capsys, *argv[:-2], "--quiet")
    assert code == 0 and all(layer["name"] in out for layer in result["layers"])


def test_clusters_and_incompatibility_bad_inputs_are_one_line_errors(family, tmp_path, capsys):
    base_dir, ft_dirs, _, _ = family
    cases = [
        (["clusters", "--base", str(base_dir), "--finetuned", str(ft_dirs[0])], "at least two"),
        (["clusters", "--base", str(base_dir), "--finetuned", str(ft_dirs[0]),
          "--finetuned", str(ft_dirs[1]), "--groups", "0"], "num_groups"),
        (["clusters", "--base", str(tmp_path / "nope"), "--finetuned", str(ft_dirs[0]),
          "--finetuned", str(ft_dirs[1])], "nope"),
        (["incompatibility", str(base_dir), str(tmp_path / "missing")], "missing"),
        (["incompatibility", str(base_dir), str(ft_dirs[0]), "--task", "bogus"], "bogus"),
        (["incompatibility", str(base_dir), str(ft_dirs[0]), "--base-a", str(base_dir)], "both bases"),
    ]
    for argv, needle in cases:
        code, out, err = _run(capsys, *argv)
        lines = err.strip().splitlines()
        assert code == 2 and out == "", argv
        assert lines[-1].startswith("error: ") and needle in lines[-1], (argv, err)
        assert "Traceback" not in err


def test_incompatibility_command_on_two_zoo_widths(tmp_path, capsys, monkeypatch):
    """Two models of different width and depth: the JSON is incompatibility_maps' result, a
    model against itself has CKA 1 on the diagonal, and the text view prints both maps."""
    from engine.analysis.incompatibility import IncompatibilityParams, incompatibility_maps
    from engine.zoo.build import new_model, write_model as write_zoo_model
    from engine.zoo.plan import Arch
    from engine.evaluate.tokenizer import tokenizer_files

    monkeypatch.setenv("DELTA_WORKBENCH_CACHE", str(tmp_path / "c.duckdb"))
    tok = tokenizer_files(tmp_path / "tok")
    small, large = tmp_path / "small", tmp_path / "large"
    write_zoo_model(small, new_model(Arch(16, 2, 2, 32), seed=1), tok, {})
    write_zoo_model(large, new_model(Arch(24, 3, 2, 48), seed=2), tok, {})
    code, out, _ = _run(capsys, "incompatibility", str(small), str(large), "--n-per-task", "2",
                        "--task", "reverse", "--json")
    assert code == 0
    result = json.loads(out)
    direct = incompatibility_maps(small, large, IncompatibilityParams(n_per_task=2, tasks=["reverse"]))
    np.testing.assert_allclose(result["activation"]["cka"], direct["activation"]["cka"], rtol=1e-12)
    np.testing.assert_allclose(result["parameters"]["mean_abs"], direct["parameters"]["mean_abs"],
                               rtol=1e-12)
    code, out, _ = _run(capsys, "incompatibility", str(small), str(small), "--n-per-task", "2",
                        "--task", "shift", "--no-cache", "--json")
    cka = json.loads(out)["activation"]["cka"]
    assert all(abs(cka[i][i] - 1.0) < 1e-9 for i in range(len(cka)))
    code, out, _ = _run(capsys, "incompatibility", str(small), str(large), "--n-per-task", "2",
                        "--task", "reverse")
    assert code == 0 and "activation CKA" in out and "parameter similarity" in out
