"""The analysis pages (spectra, similarity, channel clusters, neural incompatibility) under
AppTest with the quick zoo: charts drawn, widgets re-render, a second render reads the metric
store; bad input (missing zoo, incompatible selection, locked cache) is a message, never an
exception; and the ``analyze`` job kind: rows computed in a worker without the database, then
ingested by the app process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[2]
PAGES = ["pages/spectra.py", "pages/similarity.py", "pages/clusters.py", "pages/incompatibility.py"]


@pytest.fixture
def env(monkeypatch, tmp_path, quick_zoo):
    monkeypatch.setenv("DELTA_WORKBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DELTA_WORKBENCH_ZOO", str(quick_zoo))
    monkeypatch.setenv("DELTA_WORKBENCH_CACHE", str(tmp_path / "metrics.duckdb"))
    monkeypatch.chdir(ROOT)
    return tmp_path


def _open(page: str) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.switch_page(page).run()
    assert not at.exception, at.exception
    return at


def _figures(at) -> dict[str, dict]:
    """Plotly figures on the page by title."""
    out = {}
    for element in at.get("plotly_chart"):
        spec = json.loads(element.proto.spec)
        title = spec["layout"].get("title", {})
        out[title.get("text", "") if isinstance(title, dict) else str(title)] = spec
    return out


def _store(env):
    from cache import open_store

    return open_store(env / "metrics.duckdb")  # the process's store: the one the pages hold


def _rows(env, metric: str) -> int:
    return _store(env).stats()["metrics"].get(metric, 0)


def test_spectra_page_draws_caches_and_reacts(env):
    at = _open("pages/spectra.py")
    assert not at.error
    figures = _figures(at)
    assert {"||Δ|| / ||W0|| per layer", "Largest singular value per layer",
            "Effective and stable rank per layer"} <= set(figures)
    relnorm = figures["||Δ|| / ||W0|| per layer"]
    assert len(relnorm["data"]) == 5  # one line per fine-tune
    assert relnorm["data"][0]["x"] == [0, 1]  # the quick zoo's two layers
    heat = next(f for t, f in figures.items() if t.startswith("relative norm"))
    assert heat["data"][0]["x"] == ["q", "k", "v", "o", "gate", "up", "down"]
    rows = _rows(env, "delta")
    assert rows == 5 * 21  # every tensor of every fine-tune is in the store now
    assert any("0 hits" in c.value for c in at.caption)

    # a new session reads everything from the store
    again = _open("pages/spectra.py")
    assert any("0 computed" in c.value for c in again.caption)
    assert _rows(env, "delta") == rows

    # widgets re-render: heatmap metric, module filter, the one-tensor view
    again.selectbox(key="sp_heat_metric").set_value("effective_rank").run()
    assert not again.exception
    assert any(t.startswith("effective rank") for t in _figures(again))
    again.selectbox(key="sp_module").set_value("down").run()
    assert not again.exception
    assert len(_figures(again)["||Δ|| / ||W0|| per layer"]["data"]) == 5
    name = "model.layers.1.mlp.down_proj.weight"
    again.selectbox(key="sp_tensor").set_value(name).run()
    assert not again.exception and not again.error
    values = _figures(again)["Singular values (exact)"]["data"][0]["y"]
    assert len(values) == 48 and values == sorted(values, reverse=True)
    energy = _figures(again)["Cumulative energy Σ s_j² / ||Δ||²"]["data"][0]["y"]
    assert energy[-1] == pytest.approx(1.0)


def test_similarity_page_matrix_pair_charts_and_params(env):
    at = _open("pages/similarity.py")
    assert not at.error
    figures = _figures(at)
    cosine = figures["Cosine of whole task vectors"]["data"][0]["z"]
    assert len(cosine) == 5 and all(row[i] == pytest.approx(1.0) for i, row in enumerate(cosine))
    assert cosine[0][1] == pytest.approx(cosine[1][0])
    assert any(t.startswith("Sign conflicts per layer") for t in figures)
    assert any(t.startswith("Principal angles") for t in figures)
    pairs = _rows(env, "pair")
    assert pairs == 10 * 21  # 10 pairs x every tensor

    at.select_slider(key="si_density").set_value(0.5).run()  # a new parameter: new rows
    assert not at.exception and not at.error
    assert _rows(env, "pair") == 2 * pairs
    assert _rows(env, "delta") == 5 * 21  # per-tensor metrics do not depend on the density: reused
    at.selectbox(key="si_a").set_value("small/upper").run()
    assert not at.exception
    assert any("small/upper vs" in t for t in _figures(at))


def test_clusters_page_groups_and_storage(env):
    at = _open("pages/clusters.py")
    assert not at.error
    figures = _figures(at)
    assert "Where each expert's channels land" in figures
    stacked = figures["Where each expert's channels land"]["data"]
    assert len(stacked) == 2  # two groups
    # every expert's channels are all somewhere: the stack of each expert sums to the channel count
    channels = next(m.value for m in at.metric if m.label == "channels")
    assert all(sum(trace["y"][i] for trace in stacked) == int(channels) for i in range(5))
    assert _rows(env, "clusters") == 16
    separate = next(m.value for m in at.metric if m.label == "N experts separately")
    grouped = next(m.value for m in at.metric if m.label == "Channel Merging stores")
    assert separate != grouped

    at.number_input(key="cl_groups").set_value(5).run()  # G = N: nothing is shared
    assert not at.exception
    assert _rows(env, "clusters") == 32
    stored = _figures(at)["Stored rows as a fraction of N separate experts"]["data"][0]["y"]
    assert all(v == pytest.approx(1.0) for v in stored)
    at.selectbox(key="cl_tensor").set_value("model.layers.0.self_attn.q_proj.weight").run()
    assert not at.exception


def test_incompatibility_page_small_vs_large(env, quick_zoo_manifest):
    at = _open("pages/incompatibility.py")
    assert not at.error
    assert at.selectbox(key="ni_a").value.endswith("small/base")
    assert at.selectbox(key="ni_b").value.endswith("large/base")
    figures = _figures(at)
    cka = next(f for t, f in figures.items() if t.startswith("CKA"))["data"][0]
    layers = {m["path"]: m["arch"]["num_hidden_layers"] for m in quick_zoo_manifest["models"]}
    assert len(cka["z"]) == layers["small/base"] + 1 and len(cka["z"][0]) == layers["large/base"] + 1
    assert all(v is None or -1e-9 <= v <= 1 + 1e-9 for row in cka["z"] for v in row)
    assert any("Mean CKA" in m.value for m in at.markdown)
    assert _rows(env, "incompatibility") == 1

    again = _open("pages/incompatibility.py")  # from the store
    assert _rows(env, "incompatibility") == 1
    assert _figures(again).keys() == figures.keys()
    again.selectbox(key="ni_module").set_value("self_attn.q_proj.weight").run()
    assert not again.exception
    again.selectbox(key="ni_b").set_value(again.selectbox(key="ni_a").value).run()
    assert not again.exception
    assert any("two different models" in i.value for i in again.info)


@pytest.mark.parametrize("page", PAGES)
def test_pages_without_a_zoo_say_so(monkeypatch, tmp_path, page):
    monkeypatch.setenv("DELTA_WORKBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DELTA_WORKBENCH_ZOO", str(tmp_path / "nozoo"))
    monkeypatch.setenv("DELTA_WORKBENCH_CACHE", str(tmp_path / "metrics.duckdb"))
    monkeypatch.chdir(ROOT)
    at = _open(page)
    assert at.info and not at.get("plotly_chart")


@pytest.mark.parametrize("page", PAGES[:3])
def test_incompatible_selection_is_an_error_message(env, quick_zoo, page):
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.session_state["selection"] = {"base": str(quick_zoo / "large" / "base"),
                                     "finetunes": [str(quick_zoo / "small" / "reverse"),
                                                   str(quick_zoo / "small" / "upper")]}
    at.switch_page(page).run()
    assert not at.exception
    assert at.error and "do not match" in at.error[0].value
    assert not at.get("plotly_chart")


def test_missing_model_folder_is_an_error_message(env, quick_zoo):
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.session_state["selection"] = {"base": str(quick_zoo / "small" / "base"),
                                     "finetunes": [str(env / "gone")]}
    at.switch_page("pages/spectra.py").run()
    assert not at.exception
    assert at.error and str(env / "gone") in at.error[0].value


def test_locked_cache_computes_without_it(env):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys, time; con = duckdb.connect(sys.argv[1]); print('ready', flush=True); "
         "time.sleep(120)", str(env / "metrics.duckdb")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        at = _open("pages/spectra.py")
        assert any("locked" in i.value for i in at.info)
        assert len(at.get("plotly_chart")) >= 4 and not at.error
    finally:
        holder.kill()
        holder.wait()
    # the lock is gone: "Retry" reopens the cache and the next render fills it
    at.button(key="sp_retry_cache").click().run()
    assert not at.exception
    assert not any("locked" in i.value for i in at.info)
    assert _rows(env, "delta") == 5 * 21


def test_analyze_job_kind_returns_rows_that_the_store_serves(tmp_path, quick_zoo):
    from cache import MetricStore
    from engine.analysis import AnalysisParams, ClusterParams, analyze, analyze_clusters
    from engine.analysis.incompatibility import IncompatibilityParams, incompatibility_maps
    from engine.errors import ParameterError
    from engine.jobs.kinds import get_kind

    base = str(quick_zoo / "small" / "base")
    fts = [str(quick_zoo / "small" / t) for t in ("reverse", "upper", "sort")]
    kind = get_kind("analyze")
    params = kind.params_class.model_validate({
        "base": base, "finetuned": fts, "analysis": AnalysisParams().model_dump(mode="json"),
        "clusters": ClusterParams().model_dump(mode="json"),
        "incompatibility": {"model_a": base, "model_b": str(quick_zoo / "large" / "base"),
                            "params": {"n_per_task": 2}}})
    seen = []
    result = kind.run(params, lambda f, m: seen.append(f))
    assert seen and seen[-1] == 1.0 and all(0.0 <= f <= 1.0 for f in seen)
    result = json.loads(json.dumps(result))  # what result.json holds
    metrics = {row[2] for row in result["rows"]}
    assert metrics == {"delta", "pair", "clusters", "incompatibility"}
    assert result["summary"]["analysis"]["tensors"] == 3 * 21

    with MetricStore(tmp_path / "m.duckdb") as store:
        for row in result["rows"]:
            if row[2] == "incompatibility":
                row[5]["from_job"] = True  # marks the stored value: a recomputation would lack it
        store.put_many((tuple(row[:5]), row[5]) for row in result["rows"])
        cached = analyze(base, fts, cache=store)
        assert cached["cache"]["misses"] == 0 and cached["cache"]["hits"] == 3 * 21 + 3 * 21
        fresh = analyze(base, fts)
        assert cached["tensors"] == fresh["tensors"] and cached["pairs"] == fresh["pairs"]
        clusters = analyze_clusters(base, fts, cache=store)
        assert clusters["cache"]["misses"] == 0
        maps = incompatibility_maps(base, str(quick_zoo / "large" / "base"),
                                    IncompatibilityParams(n_per_task=2), cache=store)
        assert maps.get("from_job") is True  # served from the store: the job's value
        assert len(maps["activation"]["cka"]) == 3

    with pytest.raises(ParameterError):
        kind.run(kind.params_class.model_validate({"base": base, "finetuned": fts}), lambda f, m: None)
    with pytest.raises(ParameterError):
        kind.run(kind.params_class.model_validate({"clusters": {}}), lambda f, m: None)


def test_big_models_run_as_a_job_and_the_app_ingests(env, monkeypatch):
    from engine import settings
    from engine.jobs import JobManager

    monkeypatch.setenv("DELTA_WORKBENCH_IN_PROCESS_MAX_PARAMS", "1000")  # the zoo's models count as big
    at = _open("pages/spectra.py")
    assert any("runs as a job" in i.value for i in at.info)
    assert not at.get("plotly_chart")
    assert _rows(env, "delta") == 0  # nothing computed in the app process
    at.button(key="sp_run_job").click().run()
    assert not at.exception
    manager = JobManager(settings.jobs_dir(), gpu=False)
    (job,) = manager.jobs()
    assert job.spec.kind == "analyze"
    status = manager.wait(job.id, timeout_s=300)
    assert status.state == "done", manager.get(job.id).log_tail()
    assert not manager.get(job.id).status.ingested
    assert _rows(env, "delta") == 0  # the worker never wrote the database

    at.run()  # the page ingests the finished job and draws from the store
    assert not at.exception and not at.error
    assert manager.get(job.id).status.ingested
    assert _rows(env, "delta") == 5 * 21
    assert len(at.get("plotly_chart")) >= 4
    assert any("0 computed" in c.value for c in at.caption)


def test_one_finetune_spectra_draws_pairs_pages_ask_for_two(env, quick_zoo):
    one = {"base": str(quick_zoo / "small" / "base"), "finetunes": [str(quick_zoo / "small" / "sort")]}
    for page, charts in (("pages/spectra.py", True), ("pages/similarity.py", False), ("pages/clusters.py", False)):
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
        at.session_state["selection"] = dict(one)
        at.switch_page(page).run()
        assert not at.exception and not at.error
        assert bool(at.get("plotly_chart")) is charts
        if not charts:
            assert any("at least 2 fine-tune" in i.value for i in at.info)
