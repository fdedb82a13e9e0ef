"""MetricStore: keys, hits and misses, corrupt files moved aside, a locked file never fatal."""

from __future__ import annotations

import multiprocessing as mp
import os

import duckdb

from cache import CacheKey, MetricStore, default_path, fingerprint_key, open_store

FP = {"file": "model.safetensors", "size": 10, "mtime_ns": 1, "header_sha256": "ab"}


def key(tensor="w", metric="delta", params="{}", version="v1", fp=None):
    return CacheKey(fp or fingerprint_key(FP), tensor, metric, params, version)


def test_put_get_and_every_key_part_matters(tmp_path):
    with MetricStore(tmp_path / "m.duckdb") as store:
        assert store.status == "ok" and store.enabled
        assert store.put_many([(key(), {"x": 1.5}), (key("v"), [1, 2])]) == 2
        assert store.get(key()) == {"x": 1.5}
        got = store.get_many([key(), key("v"), key("u")])
        assert got == {key(): {"x": 1.5}, key("v"): [1, 2]}
        # a plain tuple is the same key
        assert store.get_many([tuple(key())]) == {key(): {"x": 1.5}}
        changed = fingerprint_key({**FP, "mtime_ns": 2})
        for other in (key(fp=changed), key(metric="pair"), key(params='{"k":1}'), key(version="v2")):
            assert store.get(other) is None
        store.put(key(), {"x": 2.0})  # replaced, not duplicated
        assert store.get(key()) == {"x": 2.0}
        assert store.stats()["rows"] == 2
        assert store.put_many([(key("d"), 1), (key("d"), 2)]) == 1 and store.get(key("d")) == 2
        many = [(key(f"n{i}"), {"i": i}) for i in range(1234)]  # several statements, one transaction
        assert store.put_many(many) == 1234 and store.get(key("n1233")) == {"i": 1233}
    with MetricStore(tmp_path / "m.duckdb") as again:  # persisted
        assert again.get(key("v")) == [1, 2]


def test_fingerprint_key_is_canonical():
    assert fingerprint_key(FP) == fingerprint_key(dict(reversed(list(FP.items()))))
    assert fingerprint_key(FP) != fingerprint_key({**FP, "size": 11})
    assert fingerprint_key(FP, {**FP, "file": "b"}) != fingerprint_key({**FP, "file": "b"}, FP)


def test_env_var_chooses_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTA_WORKBENCH_CACHE", str(tmp_path / "x" / "y.duckdb"))
    assert default_path() == tmp_path / "x" / "y.duckdb"
    store = open_store()
    try:
        assert store.path == tmp_path / "x" / "y.duckdb" and store.enabled
        assert open_store() is store
    finally:
        store.close()
    monkeypatch.delenv("DELTA_WORKBENCH_CACHE")
    monkeypatch.setenv("DELTA_WORKBENCH_HOME", str(tmp_path / "home"))
    assert default_path() == tmp_path / "home" / "metrics.duckdb"


def test_garbage_file_is_moved_aside_and_rebuilt(tmp_path):
    path = tmp_path / "m.duckdb"
    # a damaged database of ours: DuckDB's magic at byte 8, garbage after it (a file without
    # the magic is not ours and is refused: tests/faults/test_cache_path_faults.py)
    path.write_bytes(os.urandom(8) + b"DUCK" + os.urandom(3000))
    (tmp_path / "m.duckdb.wal").write_bytes(b"junk")
    with MetricStore(path) as store:
        assert store.status == "ok" and store.enabled
        assert "moved aside" in store.warning
        assert store.put(key(), 1) == 1 and store.get(key()) == 1
    moved = sorted(p.name for p in tmp_path.iterdir() if ".corrupt-" in p.name)
    assert len(moved) == 2 and moved[0].startswith("m.duckdb.corrupt-")
    assert any(name.startswith("m.duckdb.wal.corrupt-") for name in moved)


def test_damaged_blocks_are_detected_and_rebuilt(tmp_path):
    path = tmp_path / "m.duckdb"
    with MetricStore(path) as store:
        store.put_many([(key(f"t{i}"), {"v": "x" * 200}) for i in range(3000)])
        store._con.execute("CHECKPOINT")
    data = bytearray(path.read_bytes())
    for offset in range(3 * 4096, len(data), 4096):  # keep the file headers, damage the blocks
        data[offset + 64:offset + 512] = os.urandom(448)
    path.write_bytes(bytes(data))
    with MetricStore(path) as store:
        assert store.quarantined and "checksum" in store.warning.lower()
        assert store.get_many([key(f"t{i}") for i in range(10)]) == {}  # rebuilt empty
        assert store.put(key("fresh"), 1) == 1 and store.get(key("fresh")) == 1


class _FailingConnection:
    """Stands for a connection whose file turns out to be damaged in the middle of a query."""

    def __init__(self, real):
        self.real = real

    def cursor(self):
        raise duckdb.IOException("Corrupt database file: computed checksum 1 does not match stored checksum 2")

    def close(self):
        self.real.close()


def test_damage_found_during_a_query_is_recovered(tmp_path):
    path = tmp_path / "m.duckdb"
    with MetricStore(path) as store:
        store.put(key(), 1)
        store._con = _FailingConnection(store._con)
        assert store.get(key()) is None  # a miss, not an exception
        assert store.quarantined and store.enabled and store.status == "ok"
        store._con = _FailingConnection(store._con)
        assert store.put(key("after"), 2) == 1  # retried on the rebuilt file
        assert store.get(key("after")) == 2


def _hold(path: str, ready, release) -> None:
    store = MetricStore(path)
    store.put(key("held"), 1)
    ready.set()
    release.wait(60)
    store.close()


def test_locked_file_disables_the_store_with_the_holder(tmp_path):
    path = tmp_path / "m.duckdb"
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(path), ready, release))
    holder.start()
    try:
        assert ready.wait(120)
        store = MetricStore(path, lock_wait_s=0.1)
        assert store.status == "locked" and not store.enabled
        assert f"process {holder.pid}" in store.warning
        assert store.get(key("held")) is None and store.put(key(), 1) == 0
        assert store.stats()["rows"] == 0
        assert path.exists() and not list(tmp_path.glob("*.corrupt-*"))  # not mistaken for damage
    finally:
        release.set()
        holder.join(60)
    assert store.reopen().status == "ok" and store.get(key("held")) == 1
    store.close()


def test_read_only_and_gc(tmp_path):
    path = tmp_path / "m.duckdb"
    with MetricStore(path) as store:
        store.put_many([(key("a", version="old"), 1), (key("b", version="new"), 2)])
    with MetricStore(path, read_only=True) as ro:
        assert ro.status == "read-only" and ro.get(key("a", version="old")) == 1
        assert ro.put(key("c"), 3) == 0 and ro.gc(keep_engine_versions=["new"]) == 0
    with MetricStore(path) as store:
        assert store.gc(keep_engine_versions=["new"]) == 1
        assert store.get(key("a", version="old")) is None and store.get(key("b", version="new")) == 2


def test_folder_that_cannot_be_created_is_not_fatal(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    store = MetricStore(blocker / "sub" / "m.duckdb")
    assert not store.enabled and store.status == "unavailable"
    assert store.get(key()) is None and store.put(key(), 1) == 0
