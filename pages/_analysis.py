"""Glue shared by the analysis pages (spectra, similarity, channel clusters, neural
incompatibility): the process's metric store, "compute here or run as a job", ingest of
finished analysis jobs, and tables/figures built from the engine's plain results. No tensors.

Where metrics come from:

- models up to ``settings.in_process_max_params()`` parameters (the demo zoo's are tiny): computed in the
  app process through the metric store, in seconds; a second render reads the store;
- bigger ones: the page reads the store only (``ReadOnlyView``: a miss raises ``NotCached`` inside the
  engine before anything is computed) and offers "Run the full analysis as a job". The job
  (kind ``analyze``) computes in a worker without opening the database and returns the metric
  rows; this process, the only writer, ingests them (``ingest_analysis_jobs``) and the page
  then reads them from the store.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from engine import settings
from engine.errors import DeltaWorkbenchError
from engine.jobs.analysis_jobs import ANALYSIS_JOB_KIND, matching_job
from engine.jobs.analysis_jobs import ingest_analysis_jobs as ingest
from engine.jobs.analysis_jobs import submit_analysis_job as submit_job
from engine.metric_cache import NotCached, ReadOnlyView
from engine.tensor_names import split_layer
from engine.text import printable
from pages._shared import job_manager, short_name, show_error

JOB_KIND = ANALYSIS_JOB_KIND

MODULE_SHORT = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate",
                "up_proj": "up", "down_proj": "down"}
MODULE_ORDER = ["q", "k", "v", "o", "gate", "up", "down"]


# --------------------------------------------------------------------------- the metric store
def metric_store():
    """The process's metric store for the configured cache file (one per path, opened once;
    reopened when it was closed)."""
    from cache import MetricStore
    from engine.errors import CacheError

    path = str(settings.cache_path())
    try:
        store = _metric_store_for(path)
        if store.status == "closed":
            store.reopen()
    except CacheError as err:  # a path that is not a cache file: the page computes without one
        return MetricStore.refused(path, err)
    return store


@st.cache_resource(show_spinner=False)
def _metric_store_for(path: str):
    from cache import open_store

    return open_store(path)


def cache_notice(store, key: str) -> None:
    """A line when the cache cannot be used (locked by another process, unreadable): the page
    still works, it computes without the cache. A retry button reopens it."""
    if store.status == "ok":
        if store.quarantined:
            st.info(store.warning or "The metric cache was unreadable and has been rebuilt.")
        return
    reason = store.warning or f"the metric cache is {store.status}"
    st.info(f"{reason}. Metrics are computed on each visit until the cache is free again.")
    if st.button("Retry the metric cache", key=f"{key}_retry_cache"):
        if store.status != "refused":  # a refused path is checked again on the rerun
            store.reopen()
        st.rerun()


def _largest_parameter_count(*paths) -> int:
    from engine.lora.finetune import largest_parameter_count  # headers only

    return largest_parameter_count(*paths)


def guarded(what: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, or a clear message on the page and None for bad input (never a traceback)."""
    try:
        return fn()
    except DeltaWorkbenchError as err:
        show_error(err, what)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        st.error(f"{what}: {type(err).__name__}: {err}".splitlines()[0])
    return None


def metrics_or_job(compute: Callable[[Any], dict], *, job_params: dict, n_params: int,
                   title: str, key: str, spinner: str = "Computing the metrics...") -> dict | None:
    """The engine's result: computed here (small models), read from the store, or None while
    a job is offered or running (big models). ``compute(cache)`` calls the engine."""
    store = metric_store()
    cache_notice(store, key)
    ingest_analysis_jobs(store)
    if n_params <= settings.in_process_max_params():
        with st.spinner(spinner):
            return compute(store)
    try:
        return compute(ReadOnlyView(store))
    except NotCached:
        analysis_job_panel(job_params, title=title, n_params=n_params, key=key)
        return None


def metrics_of(paths: Sequence[str | None], compute: Callable[[Any], dict], *, job_params: dict,
               title: str, key: str, spinner: str, failed: str) -> dict:
    """``metrics_or_job`` for the models at ``paths`` (their size picks here or a job), with
    bad input shown on the page; stops the page when there is no result (yet)."""
    n_params = guarded("The models cannot be read", lambda: _largest_parameter_count(*paths))
    if n_params is None:
        st.stop()
    result = guarded(failed, lambda: metrics_or_job(compute, job_params=job_params, n_params=n_params,
                                                    title=title, key=key, spinner=spinner))
    if result is None:
        st.stop()
    return result


# --------------------------------------------------------------------------- analysis jobs
def analysis_of_selection(base: str, finetunes: list[str], params, *, title: str, key: str,
                          spinner: str) -> dict:
    """``engine.analysis.analyze`` of the selected models (cached; a job for big models), its
    warnings shown; stops the page with a message when it cannot be had."""
    from engine.analysis.run import analyze

    result = metrics_of([base, *finetunes], lambda cache: analyze(base, finetunes, params, cache=cache),
                        job_params={"base": base, "finetuned": finetunes,
                                    "analysis": params.model_dump(mode="json")},
                        title=title, key=key, spinner=spinner, failed="The analysis failed")
    for warning in result.get("warnings", []):
        st.warning(warning)
    return result


def submit_analysis_job(params: dict, title: str) -> str:
    return submit_job(job_manager(), params, title)


def ingest_analysis_jobs(store, manager=None) -> int:
    """The engine's ingest (``engine.jobs.analysis_jobs``) with its warnings on the page."""
    done = ingest(store, manager or job_manager())
    for line in done.warnings:
        st.warning(line)
    return done.rows


def analysis_job_panel(params: dict, *, title: str, n_params: int, key: str) -> None:
    """Offer the job, or follow the one that runs for exactly these parameters."""
    manager = job_manager()
    st.info(f"{n_params:,} parameters: more than this page computes in place "
            f"({settings.in_process_max_params():,}). The full analysis runs as a job in a worker process "
            "(on the GPU when there is one); its results go into the metric cache and this page "
            "draws them from there.")
    job = matching_job(manager, params)
    if job is not None and job.status.state in ("queued", "running"):
        _follow_job(job.id)
        return
    if job is not None and job.status.state == "failed":
        st.error(f"The last analysis job failed: {job.status.error}")
    elif job is not None and job.status.state == "done" and not metric_store().writable:
        st.warning("The analysis job finished, but the metric cache cannot be written now; "
                   "retry once it is free.")
    if st.button("Run the full analysis as a job", key=f"{key}_run_job", type="primary"):
        try:
            job_id = submit_analysis_job(params, title)
        except (DeltaWorkbenchError, ValueError) as err:
            st.error(f"The job cannot be queued: {err}".splitlines()[0])
            return
        st.success(f"Queued job `{job_id}` (see the Jobs page).")
        st.rerun()


@st.fragment(run_every=1.0)
def _follow_job(job_id: str) -> None:
    manager = job_manager()
    manager.poll()
    try:
        job = manager.get(job_id)
    except DeltaWorkbenchError as err:
        show_error(err)
        return
    if job.status.state in ("queued", "running"):
        st.progress(job.status.progress, text=job.status.message or job.status.state)
        if st.button("Cancel", key=f"cancel_{job_id}"):
            manager.cancel(job_id)
            st.rerun()
    elif job.status.state == "done":
        ingest_analysis_jobs(metric_store(), manager)
        st.rerun()
    elif job.status.state == "failed":
        st.error(f"The analysis job failed: {job.status.error}")


# --------------------------------------------------------------------------- tables
def split_name(name: str) -> tuple[int | None, str]:
    """(layer index, short module name) of a tensor name; (None, name) outside the layers."""
    split = split_layer(name)
    if split is None or not split[1]:
        return None, name.removesuffix(".weight")
    layer, suffix = split
    parts = suffix.split(".")
    if parts[-1] in ("weight", "bias") and len(parts) > 1:
        tail = parts[-2]
        short = MODULE_SHORT.get(tail, tail)
        return layer, short if parts[-1] == "weight" else f"{short}.bias"
    return layer, suffix


def module_order(modules) -> list[str]:
    modules = list(dict.fromkeys(modules))
    return [m for m in MODULE_ORDER if m in modules] + sorted(m for m in modules if m not in MODULE_ORDER)


def tensor_order(names) -> list[str]:
    """Per-layer tensors first (by layer, then q/k/v/o/gate/up/down), then the rest by name."""
    def key(name: str):
        layer, module = split_name(name)
        rank = MODULE_ORDER.index(module) if module in MODULE_ORDER else len(MODULE_ORDER)
        return (layer is None, layer if layer is not None else 0, rank, name)
    return sorted(dict.fromkeys(names), key=key)


def tensor_label(name: str) -> str:
    """``L3 q`` for a per-layer tensor, the name without ``.weight`` otherwise (escaped: names
    come from the checkpoint's header)."""
    layer, module = split_name(name)
    return printable(f"L{layer} {module}" if layer is not None else module)


def tensor_frame(result: dict) -> pd.DataFrame:
    """One row per (tensor, fine-tune) of ``analyze``'s result, with layer/module columns."""
    labels = [short_name(p) for p in result["finetuned"]]
    rows = []
    for t in result["tensors"]:
        layer, module = split_name(t["name"])
        top = t.get("top_singular_values") or []
        rows.append({**{k: v for k, v in t.items() if k != "top_singular_values"},
                     "finetune": labels[t["model"]], "layer": layer, "module": module,
                     "s1": top[0] if top else None, "top_singular_values": top,
                     "shape": "x".join(str(s) for s in t.get("shape", []))})
    return pd.DataFrame(rows)


def pair_frame(result: dict) -> pd.DataFrame:
    labels = [short_name(p) for p in result["finetuned"]]
    rows = []
    for p in result["pairs"]:
        layer, module = split_name(p["name"])
        cosines = p.get("principal_cosines") or []
        rows.append({**p, "a_label": labels[p["a"]], "b_label": labels[p["b"]], "layer": layer,
                     "module": module,
                     "angles_deg": [math.degrees(math.acos(max(-1.0, min(1.0, c)))) for c in cosines
                                    if c is not None]})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- figures
def layer_module_heatmap(frame: pd.DataFrame, value: str, title: str, *, colorscale: str = "Viridis",
                         zmid: float | None = None, clickable: bool = False) -> go.Figure | None:
    """Layers in rows, modules in columns, ``value`` as colour (None when nothing to show).
    ``clickable`` lays invisible markers over the cells: plotly heatmaps cannot be selected, so a
    click selects the marker (x = module, y = layer) and ``st.plotly_chart(on_select=...)`` sees it."""
    sub = frame[frame["layer"].notna()]
    if sub.empty or value not in sub:
        return None
    table = sub.pivot_table(index="layer", columns="module", values=value, aggfunc="mean")
    table = table[[m for m in module_order(table.columns)]]
    z = table.to_numpy(dtype=float)
    text = [[("" if math.isnan(v) else f"{v:.3g}") for v in row] for row in z]
    fig = go.Figure(go.Heatmap(z=z, x=list(table.columns), y=[int(i) for i in table.index],
                               text=text, texttemplate="%{text}", colorscale=colorscale, zmid=zmid,
                               hovertemplate="layer %{y} · %{x}: %{z:.4g}<extra></extra>"))
    if clickable:
        cells = [(m, int(i)) for i, row in zip(table.index, z) for m, v in zip(table.columns, row)
                 if not math.isnan(v)]
        fig.add_trace(go.Scatter(x=[c[0] for c in cells], y=[c[1] for c in cells], mode="markers",
                                 marker={"size": 30, "opacity": 0}, showlegend=False,
                                 hovertemplate="layer %{y} · %{x}: click for its spectrum<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="module", yaxis_title="layer",
                      yaxis={"autorange": "reversed", "dtick": 1}, height=max(260, 60 + 28 * len(table)),
                      margin={"t": 50, "b": 40})
    return fig


def matrix_heatmap(z, labels_x, labels_y, title: str, *, zmin=None, zmax=None, zmid=None,
                   colorscale: str = "RdBu", x_title: str = "", y_title: str = "",
                   reverse_y: bool = True) -> go.Figure:
    values = [[(None if v is None else float(v)) for v in row] for row in z]
    text = [[("" if v is None else f"{v:.2f}") for v in row] for row in values]
    fig = go.Figure(go.Heatmap(z=values, x=labels_x, y=labels_y, text=text, texttemplate="%{text}",
                               zmin=zmin, zmax=zmax, zmid=zmid, colorscale=colorscale,
                               hovertemplate="%{y} · %{x}: %{z:.4f}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title,
                      yaxis={"autorange": "reversed"} if reverse_y else {},
                      height=max(300, 80 + 34 * len(labels_y)), margin={"t": 50, "b": 40})
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category")
    return fig


def per_layer_lines(frame: pd.DataFrame, value: str, title: str, *, color: str = "finetune",
                    y_title: str | None = None) -> go.Figure:
    """``value`` against the layer index, one line per ``color`` group (mean over the rest)."""
    fig = go.Figure()
    sub = frame[frame["layer"].notna()]
    for group, part in sub.groupby(color, sort=False):
        series = part.groupby("layer")[value].mean()
        fig.add_trace(go.Scatter(x=[int(i) for i in series.index], y=series.tolist(), mode="lines+markers",
                                 name=str(group)))
    fig.update_layout(title=title, xaxis_title="layer", yaxis_title=y_title or value,
                      xaxis={"dtick": 1}, height=340, margin={"t": 50, "b": 40})
    return fig
