"""BitDelta distillation and DBMS on the user's JSONL file (``--calibration``): they learn on
the file's dev lines, their result is the one the same examples give by another way, and it
differs from the zoo-task calibration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.__main__ import main
from engine.compress import calibration as ccal
from engine.evaluate.own_data import split_of

WORDS = ("abc", "hello", "world", "zebra", "mango", "plum", "kiwi", "lemon", "grape", "melon",
         "peach", "apple", "berry", "cherry", "olive", "onion")


@pytest.fixture(scope="module")
def pair(quick_zoo):
    root = Path(quick_zoo) / "small"
    return root / "base", root / "reverse"


def data_file(tmp_path: Path) -> tuple[Path, list]:
    examples = [(f"rev:{w}=", w[::-1]) for w in WORDS]
    markers = [(f"MARKER {i} rev:ab=", "MARKER") for i in range(40)]
    markers = [m for m in markers if split_of(m[0]) == "heldout"][:4]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n"
                            for p, a in markers[:2] + examples + markers[2:]))
    return path, [e for e in examples if split_of(e[0]) == "dev"]


def run(capsys, base, ft, out, method, *extra) -> dict:
    # explicit settings, no --ratio: a ratio's byte budget counts the manifest, which records
    # the data file's path, so the inner compressor's choices would differ between the runs
    code = main(["compress", "--base", str(base), "--finetuned", str(ft), "--method", method,
                 "--param", "n_prompts=4", "--param", "steps=5", "--device", "cpu",
                 "--json", "--quiet", "--out", str(out), *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def learned(out: Path, method: str):
    """What calibration changed: DBMS's two scalars, BitDelta's distilled scale bytes."""
    if method == "dbms":
        params = json.loads((out / "manifest.json").read_text())["params"]
        return params["alpha"], params["scale"]
    return (out / "delta.safetensors").read_bytes()


@pytest.mark.parametrize("method,extra", [
    ("dbms", ("--param", "inner=svd", "--param", "inner_params.rank=2")),
    ("bitdelta", ("--param", "objective=task_kl", "--param", "planes=1"))])
def test_cli_calibration_learns_on_the_files_dev_lines(pair, tmp_path, capsys, monkeypatch, method, extra):
    base, ft = pair
    path, dev = data_file(tmp_path)
    seen: list = []
    real = ccal.calibration_batch

    def spy(tokenizer, pairs, device):
        seen.append(list(pairs))
        return real(tokenizer, pairs, device)

    monkeypatch.setattr(ccal, "calibration_batch", spy)
    summary = run(capsys, base, ft, tmp_path / "own", method, *extra, "--calibration", str(path))
    assert summary["calibration"]["data"] == str(path) and summary["calibration"]["examples"] == 4
    assert "tasks" not in summary["calibration"]
    assert len(seen) == 1 and len(seen[0]) == 4 and set(seen[0]) <= set(dev)
    manifest = json.loads((tmp_path / "own" / "manifest.json").read_text())
    assert manifest["params"]["calibration_data"] == str(path)

    # the same examples by another way (the zoo path handed them): the same learned result
    with monkeypatch.context() as m:
        m.setattr(ccal, "calibration_texts", lambda tasks, n, seed: list(seen[0]))
        run(capsys, base, ft, tmp_path / "same", method, *extra)
    assert learned(tmp_path / "same", method) == learned(tmp_path / "own", method)
    # the zoo task's own prompts: another result
    zoo = run(capsys, base, ft, tmp_path / "zoo", method, *extra)
    assert zoo["calibration"]["tasks"] == ["reverse"]
    assert learned(tmp_path / "zoo", method) != learned(tmp_path / "own", method)


def test_a_small_dev_split_is_used_whole_with_a_warning(pair, tmp_path, capsys):
    base, ft = pair
    path, dev = data_file(tmp_path)
    code = main(["compress", "--base", str(base), "--finetuned", str(ft), "--method", "dbms",
                 "--ratio", "16", "--param", "inner=svd", "--param", "n_prompts=100",
                 "--param", "steps=2", "--device", "cpu", "--json", "--quiet",
                 "--calibration", str(path), "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 0
    assert json.loads(captured.out)["calibration"]["examples"] == len(dev)
    assert (f"warning: {path}: calibration_data: 100 calibration examples asked, its dev split "
            f"holds {len(dev)} (of {len(WORDS) + 4})") in captured.err


def test_logit_mse_distils_on_the_files_dev_lines_packed_into_rows(pair, tmp_path, capsys, monkeypatch):
    """BitDelta's default (the authors' logit MSE) reads the file as its generic text: every
    row is packed from the file's dev examples only; a file too small for the rows is cycled,
    and the reuse is reported."""
    base, ft = pair
    path, dev = data_file(tmp_path)
    seen: list = []
    real = ccal.packed_rows

    def spy(tokenizer, items, n_rows, seq_len):
        def recorded():
            for item in items:
                seen.append(item)
                yield item
        return real(tokenizer, recorded(), n_rows, seq_len)

    monkeypatch.setattr(ccal, "packed_rows", spy)
    code = main(["compress", "--base", str(base), "--finetuned", str(ft), "--method", "bitdelta",
                 "--param", "planes=1", "--param", "steps=3", "--param", "batch_size=2",
                 "--param", "seq_len=32", "--device", "cpu", "--json", "--quiet",
                 "--calibration", str(path), "--out", str(tmp_path / "own")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    report = summary["calibration"]["distill"]
    assert report["objective"] == "logit_mse" and report["passes"] > 1
    assert summary["calibration"]["data"] == str(path)
    assert seen and set(seen) <= set(dev) and set(dev) <= set(seen)  # all of them, nothing else
    assert "examples reused" in captured.err
