"""One writer: while a process owns the cache and writes, other processes still analyse (without
the cache, same numbers, a warning naming the holder); the writer's rows stay intact."""

from __future__ import annotations

import multiprocessing as mp
import time

from cache import CacheKey, MetricStore
from engine.analysis import analyze
from tests.analysis.helpers import make_family

MAX_BATCHES, PER_BATCH = 5000, 20


def _writer(path: str, ready, stop, written) -> None:
    store = MetricStore(path)
    ready.set()
    count = 0
    batch = 0
    while not stop.is_set() and batch < MAX_BATCHES:  # keeps writing until the readers are done
        rows = [(CacheKey("fp", f"t{batch}.{i}", "delta", "{}", "test"), {"batch": batch, "i": i})
                for i in range(PER_BATCH)]
        count += store.put_many(rows)
        batch += 1
        time.sleep(0.02)
    written.value = count
    store.close()


def _reader(path: str, base: str, fts: list[str], out) -> None:
    store = MetricStore(path, lock_wait_s=0.1)
    try:
        result = analyze(base, fts, cache=store)
        out.put({"status": store.status, "warning": store.warning,
                 "tensors": result["tensors"], "pairs": result["pairs"], "cache": result["cache"]})
    except BaseException as err:  # report, never hang the test
        out.put({"error": repr(err)})
    finally:
        store.close()


def test_two_readers_while_one_writes(tmp_path):
    base_dir, ft_dirs, _, _ = make_family(tmp_path / "models", n_finetunes=2)
    path = str(tmp_path / "shared.duckdb")
    reference = analyze(base_dir, ft_dirs)

    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    written = ctx.Value("i", -1)
    out = ctx.Queue()
    writer = ctx.Process(target=_writer, args=(path, ready, stop, written))
    writer.start()
    readers = []
    try:
        assert ready.wait(120), "writer did not start"
        readers = [ctx.Process(target=_reader, args=(path, str(base_dir), [str(d) for d in ft_dirs], out))
                   for _ in range(2)]
        for r in readers:
            r.start()
        results = [out.get(timeout=180) for _ in readers]
    finally:
        stop.set()
        for r in readers:
            r.join(60)
        writer.join(120)
    assert writer.exitcode == 0 and all(r.exitcode == 0 for r in readers)
    for res in results:
        assert "error" not in res, res
        assert res["status"] == "locked" and f"process {writer.pid}" in res["warning"]
        assert res["cache"]["hits"] == 0 and res["cache"]["written"] == 0
        assert res["tensors"] == reference["tensors"] and res["pairs"] == reference["pairs"]

    # the writer's committed rows are all there, and the file now serves a normal session
    assert written.value > 0
    with MetricStore(path) as store:
        assert store.stats()["metrics"] == {"delta": written.value}
        first = analyze(base_dir, ft_dirs, cache=store)
        second = analyze(base_dir, ft_dirs, cache=store)
    assert first["cache"]["written"] > 0 and second["cache"]["misses"] == 0
    assert second["tensors"] == reference["tensors"]
