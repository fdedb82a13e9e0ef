"""engine/metric_cache.py: one key rule (the store and the analysis use it), one interface
(the store and both views follow it), and the app's ingest of recorded job rows."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from cache import MetricStore
from engine.errors import DeltaWorkbenchError
from engine.jobs.analysis_jobs import (ANALYSIS_JOB_KIND, ingest_analysis_jobs, matching_job,
                                       normal_params)
from engine.metric_cache import (CacheKey, MetricCache, NotCached, ReadOnlyView, RecordingCache,
                                 fingerprint_key, recorded_rows)

REPO = Path(__file__).resolve().parents[1]
FP = {"file": "model.safetensors", "size": 10, "mtime_ns": 1, "header_sha256": "ab"}


def _key(tensor="t", metric="delta"):
    return CacheKey(fingerprint_key(FP), tensor, metric, "{}", "v1")


def test_store_and_views_follow_one_interface(tmp_path):
    store = MetricStore(tmp_path / "m.duckdb")
    try:
        for cache in (store, ReadOnlyView(store), RecordingCache()):
            assert isinstance(cache, MetricCache), type(cache).__name__
    finally:
        store.close()


def test_read_only_view_answers_from_the_store_or_refuses(tmp_path):
    store = MetricStore(tmp_path / "m.duckdb")
    try:
        store.put_many([(_key("a"), {"x": 1.0})])
        view = ReadOnlyView(store)
        assert view.get_many([_key("a")]) == {_key("a"): {"x": 1.0}}
        with pytest.raises(NotCached, match="1 of 2 values are not cached"):
            view.get_many([_key("a"), _key("b")])
        assert view.put_many([(_key("b"), {"x": 2.0})]) == 0
        assert store.get_many([_key("b")]) == {}  # the view never writes
    finally:
        store.close()


def test_recorded_rows_round_trip_into_the_store(tmp_path):
    recorder = RecordingCache()
    assert recorder.get_many([_key("a")]) == {}
    assert recorder.put_many([(_key("a"), {"x": 1.5}), (_key("b", "pair"), [1, 2])]) == 2
    result = {"rows": recorder.rows + [["short"], "junk"]}  # malformed rows are skipped
    rows = recorded_rows(result)
    assert rows == [(_key("a"), {"x": 1.5}), (_key("b", "pair"), [1, 2])]
    store = MetricStore(tmp_path / "m.duckdb")
    try:
        assert store.put_many(rows) == 2
        assert store.get_many([_key("b", "pair")]) == {_key("b", "pair"): [1, 2]}
    finally:
        store.close()


class _Manager:
    def __init__(self, jobs):
        self._jobs, self.marked = jobs, []

    def jobs(self):
        return self._jobs

    def mark_ingested(self, job_id):
        self.marked.append(job_id)


def _job(job_id, kind=ANALYSIS_JOB_KIND, state="done", ingested=False, result=None, error=None):
    def read():
        if error is not None:
            raise error
        return result

    return SimpleNamespace(id=job_id, spec=SimpleNamespace(kind=kind),
                           status=SimpleNamespace(state=state, ingested=ingested), result=read)


def test_ingest_loads_each_finished_analysis_job_once(tmp_path):
    rows = [[*_key("a"), {"x": 1.0}]]
    manager = _Manager([
        _job("j1", result={"rows": rows}),
        _job("j2", state="running", result={"rows": rows}),  # not finished: left alone
        _job("j3", kind="merge", result={"rows": rows}),  # another kind: left alone
        _job("j4", ingested=True, result={"rows": rows}),  # done before
        _job("j5", error=DeltaWorkbenchError("result.json unreadable")),
    ])
    store = MetricStore(tmp_path / "m.duckdb")
    try:
        done = ingest_analysis_jobs(store, manager)
        assert (done.rows, done.jobs) == (1, 1)
        assert manager.marked == ["j1", "j5"]
        assert len(done.warnings) == 1 and "j5" in done.warnings[0]
        assert store.get_many([_key("a")]) == {_key("a"): {"x": 1.0}}
        read_only = SimpleNamespace(writable=False)
        assert ingest_analysis_jobs(read_only, _Manager([_job("j6", result={"rows": rows})])).rows == 0
    finally:
        store.close()


def test_the_key_rule_is_defined_once():
    """No other module hashes JSON into a cache key or keeps its own stand-in of the store."""
    for path in [*(REPO / "engine").rglob("*.py"), *(REPO / "cache").rglob("*.py"),
                 *(REPO / "pages").rglob("*.py")]:
        if path.name == "metric_cache.py":
            continue
        text = path.read_text()
        for copy in ("class CacheKey", "def fingerprint_key", "def canonical_json",
                     "class _RecordingCache", "class CacheOnly"):
            assert copy not in text, f"{path.relative_to(REPO)} defines {copy}"


def test_matching_job_finds_the_newest_job_of_equal_parameters():
    params = {"base": "b", "finetuned": ["f"], "analysis": {}}
    same = normal_params(params)
    newest = SimpleNamespace(id="new", spec=SimpleNamespace(kind=ANALYSIS_JOB_KIND, params=same))
    older = SimpleNamespace(id="old", spec=SimpleNamespace(kind=ANALYSIS_JOB_KIND, params=same))
    other = SimpleNamespace(id="x", spec=SimpleNamespace(kind=ANALYSIS_JOB_KIND,
                                                         params={**same, "finetuned": ["g"]}))
    assert matching_job(_Manager([other, newest, older]), params).id == "new"
    assert matching_job(_Manager([other]), params) is None


def test_parameter_count_of_an_adapter_is_its_bases(tmp_path):
    from engine.lora.finetune import largest_parameter_count, parameter_count
    from tests.lora.peft_builders import make_adapter, tiny_llama

    model = tiny_llama(tmp_path / "base")
    make_adapter(model, tmp_path / "adapter", target_modules=["q_proj"])
    n = sum(p.numel() for p in model.state_dict().values())
    assert parameter_count(tmp_path / "base") == n
    assert parameter_count(tmp_path / "adapter", tmp_path / "base") == n
    assert largest_parameter_count(tmp_path / "adapter", tmp_path / "base", None) == n
    with pytest.raises(DeltaWorkbenchError, match="needs a base"):
        parameter_count(tmp_path / "adapter")
