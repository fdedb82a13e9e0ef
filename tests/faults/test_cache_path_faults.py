"""Issue 19 item 8 (reliability 20-21): the metric cache path never harms what it names.

``DELTA_WORKBENCH_CACHE`` / ``--cache`` pointing at a model file, a folder, a FIFO or any file
that is not a DuckDB database is refused with a one-line CacheError naming the path, and the
thing is left exactly as it was (no rename to ``*.corrupt-*``, no database written in its
place). Only a damaged DuckDB database of ours is still moved aside and rebuilt.
"""

from __future__ import annotations

import os
import threading

import duckdb
import pytest

from cache import MetricStore, open_store
from engine.__main__ import main
from engine.errors import CacheError
from tests.io.builders import snapshot, tiny_tensors, write_model


def _refused(path, *, via_env=None, monkeypatch=None):
    """Open the store on ``path``; assert a one-line CacheError naming it."""
    if via_env:
        monkeypatch.setenv("DELTA_WORKBENCH_CACHE", str(path))
        opener = open_store
    else:
        def opener():
            return MetricStore(path)
    with pytest.raises(CacheError) as info:
        opener()
    message = str(info.value)
    assert type(info.value) is CacheError
    assert str(path) in message and "\n" not in message
    return message


def test_model_file_as_cache_is_refused_and_untouched(tmp_path, monkeypatch):
    model = write_model(tmp_path / "m", tiny_tensors())
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    before = snapshot(tmp_path)
    message = _refused(weights, via_env=True, monkeypatch=monkeypatch)
    assert "not a DuckDB database" in message
    assert weights.read_bytes() == data and snapshot(tmp_path) == before


def test_cli_cache_option_on_a_model_file_is_one_line_exit_2(tmp_path, capsys):
    base = write_model(tmp_path / "base", tiny_tensors(seed=0))
    ft = write_model(tmp_path / "ft", tiny_tensors(seed=1))
    weights = base / "model.safetensors"
    data = weights.read_bytes()
    before = snapshot(tmp_path)
    code = main(["analyze", "--base", str(base), "--finetuned", str(ft), "--cache", str(weights),
                 "--json", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and str(weights) in err
    assert "Traceback" not in err
    assert weights.read_bytes() == data and snapshot(tmp_path) == before


def test_folder_as_cache_is_refused_and_untouched(tmp_path):
    folder = tmp_path / "cache_dir"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    before = snapshot(tmp_path)
    assert "folder" in _refused(folder)
    assert snapshot(tmp_path) == before and (folder / "keep.txt").read_text() == "mine"


def test_fifo_as_cache_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "cache.fifo"
    os.mkfifo(fifo)
    before = snapshot(tmp_path)
    outcome: list = []

    def attempt():
        try:
            MetricStore(fifo)
            outcome.append(None)
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            outcome.append(err)

    # an open() of a FIFO without a writer blocks forever: the attempt runs on a daemon thread
    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(20)
    if worker.is_alive():
        with open(fifo, "wb"):  # unblock the stuck open so the thread can end
            pass
        pytest.fail("opening the metric cache on a FIFO blocked")
    assert len(outcome) == 1 and isinstance(outcome[0], CacheError), outcome
    assert str(fifo) in str(outcome[0]) and "FIFO" in str(outcome[0])
    assert snapshot(tmp_path) == before and fifo.is_fifo()


def test_non_duckdb_file_is_refused_and_untouched(tmp_path):
    garbage = tmp_path / "notes.duckdb"
    garbage.write_bytes(b"my notes, not a database\n" * 200)
    before = snapshot(tmp_path)
    _refused(garbage)
    assert snapshot(tmp_path) == before
    assert garbage.read_bytes() == b"my notes, not a database\n" * 200


def test_a_tilde_is_not_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    message = _refused("~/metrics.duckdb", via_env=True, monkeypatch=monkeypatch)
    assert "'~' is not expanded" in message
    assert list((tmp_path / "home").iterdir()) == []


def test_damaged_real_duckdb_file_is_still_moved_aside_and_rebuilt(tmp_path):
    path = tmp_path / "m.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE t AS SELECT range AS x FROM range(100000)")
    con.execute("CHECKPOINT")
    con.close()
    data = path.read_bytes()
    assert data[8:12] == b"DUCK"  # the magic the check relies on, from a real file
    path.write_bytes(data[: len(data) // 2])  # truncated: DuckDB cannot open it
    with MetricStore(path) as store:
        assert store.status == "ok" and store.quarantined
        assert "moved aside" in store.warning
        assert store.put(("f", "t", "m", "{}", "v"), 1) == 1
    moved = [p.name for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert len(moved) == 1 and moved[0].startswith("m.duckdb.corrupt-")
