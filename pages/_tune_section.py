"""The merge lab's "Tune" section: tick the numeric parameters of the rendered form to search
(each over an interval), choose the budget and the sampler, run the tune as a ``tune`` job
(``engine.tune``: an Optuna study scored on the dev split), follow its best-so-far chart and
trials table, and load the best trial into the what-if form ("Use best"). Glue only."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
import yaml

from engine.errors import DeltaWorkbenchError
from engine.jobs import JobSpec
from engine.textparse import parse_yaml
from pages._forms import float_fields
from pages._shared import job_manager, new_export_folder, show_error

JOB_KEY = "tune_job"
SAMPLERS = ("cmaes", "tpe", "random")


def _interval(alias: str, low, high, default) -> tuple[float, float]:
    lo = float(low) if low is not None else 0.0
    if high is not None:
        hi = float(high)
    else:
        hi = max(1.0, 2.0 * float(default)) if isinstance(default, (int, float)) else 2.0
    return lo, hi


def _field_names(params_class) -> dict[str, str]:
    """alias -> field name of the float fields (the what-if form's widget keys use the name)."""
    floats = {alias for alias, *_ in float_fields(params_class)}
    return {(info.alias or name): name for name, info in params_class.model_fields.items()
            if (info.alias or name) in floats}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def tune_recipe(method_name: str, base: str, finetunes: list[str], params: dict,
                model_params: list[dict], picked_global: dict, picked_model: dict) -> dict:
    """The what-if form's recipe with the picked parameters as ``{range: [lo, hi]}``."""
    glob = {**params, **{a: {"range": list(r)} for a, r in picked_global.items()}}
    models = [{"model": f, "parameters": {**mp, **{a: {"range": list(r)} for a, r in picked_model.items()}}}
              for f, mp in zip(finetunes, model_params)]
    data = {"merge_method": method_name, "base_model": base, "models": models}
    if glob:
        data["parameters"] = glob
    return data


def _use_best(best: dict, method_name: str, global_names: dict, model_names: dict) -> None:
    """on_click: put the best recipe's values into the what-if form's widgets (before they
    are drawn again)."""
    for alias, value in (best.get("parameters") or {}).items():
        if alias in global_names and _number(value):
            st.session_state[f"ml.{method_name}.{global_names[alias]}"] = float(value)
    for i, model in enumerate(best.get("models") or []):
        for alias, value in (model.get("parameters") or {}).items():
            if alias in model_names and _number(value):
                st.session_state[f"ml.{method_name}.{i}.{model_names[alias]}"] = float(value)


def tune_section(method, base: str, finetunes: list[str], params: dict,
                 model_params: list[dict]) -> None:
    st.subheader("Tune")
    st.caption("Search the ticked parameters automatically: each trial is merged and scored in "
               "memory on the dev split (never the held-out examples shown above); the best "
               "trial's recipe can be loaded into the form.")
    name = method.name
    global_fields = float_fields(method.params_class)
    model_fields = float_fields(method.model_params_class)
    if not global_fields and not model_fields:
        st.info(f"{name} has no numeric parameter to tune.")
        return
    picked_global: dict[str, tuple[float, float]] = {}
    picked_model: dict[str, tuple[float, float]] = {}
    for scope, fields, picked in (("global", global_fields, picked_global),
                                  ("model", model_fields, picked_model)):
        for alias, low, high, default in fields:
            label = alias if scope == "global" else f"{alias} (each model)"
            if not st.checkbox(f"search {label}", key=f"tune_pick.{name}.{scope}.{alias}"):
                continue
            lo, hi = _interval(alias, low, high, default)
            cols = st.columns(2)
            lo = cols[0].number_input(f"{label}: from", value=lo, key=f"tune_lo.{name}.{scope}.{alias}")
            hi = cols[1].number_input(f"{label}: to", value=hi, key=f"tune_hi.{name}.{scope}.{alias}")
            picked[alias] = (float(lo), float(hi))
    cols = st.columns(3)
    trials = int(cols[0].number_input("Trials", 1, 1000, 20, key="tune_trials"))
    sampler = cols[1].selectbox("Sampler", SAMPLERS, key="tune_sampler",
                                help="cmaes: CMA-ES (mergekit-evolve's); tpe: Optuna's TPE; random")
    out_name = cols[2].text_input("Output folder (under the export folder)", value=f"tune-{name}",
                                  key="tune_out_name")
    if picked_global or picked_model:
        data = tune_recipe(name, base, finetunes, params, model_params, picked_global, picked_model)
        recipe_yaml = yaml.safe_dump(data, sort_keys=False)
        with st.expander("Tune recipe"):
            st.code(recipe_yaml, language="yaml")
        if st.button("Run the tune as a job", key="tune_run"):
            try:
                out = new_export_folder(out_name) / "best.yml"
                job_id = job_manager().submit(JobSpec(
                    kind="tune", title=f"tune {name} ({trials} trials, {sampler})",
                    params={"recipe_yaml": recipe_yaml, "out": str(out), "trials": trials,
                            "sampler": sampler}))
                st.session_state[JOB_KEY] = {"id": job_id, "out": str(out), "method": name}
                st.success(f"Queued job {job_id}: its progress shows below and on the Jobs page.")
            except DeltaWorkbenchError as err:
                show_error(err, "Cannot run the tune")
    else:
        st.info("Tick at least one parameter to search.")
    job = st.session_state.get(JOB_KEY)
    if job and job.get("method") == name:
        _progress(job, name, _field_names(method.params_class),
                  _field_names(method.model_params_class))


def _progress(job: dict, method_name: str, global_names: dict, model_names: dict) -> None:
    try:
        record = job_manager().get(job["id"])
    except DeltaWorkbenchError as err:
        show_error(err, "Tune job")
        return
    status = record.status
    st.caption(f"Tune job {job['id']}: {status.state}" + (f" ({status.message})" if status.message else ""))
    history_path = Path(job["out"]).with_suffix(".history.json")
    history = json.loads(history_path.read_text()) if history_path.exists() else []
    if history:
        chart = go.Figure()
        chart.add_scatter(x=[h["trial"] for h in history], y=[h["score"] for h in history],
                          mode="markers", name="trial")
        chart.add_scatter(x=[h["trial"] for h in history], y=[h["best"] for h in history],
                          mode="lines", name="best so far")
        chart.update_layout(xaxis={"title": "trial"}, yaxis={"title": "dev score", "range": [0, 1.05]},
                            height=300, margin={"t": 20, "b": 20})
        st.plotly_chart(chart, width="stretch", key="tune_chart")
    if status.state == "failed":
        st.error(f"The tune failed: {status.error or status.message}".splitlines()[0])
        return
    if status.state != "done":
        st.button("Refresh", key="tune_refresh")
        return
    result = record.result() or {}
    table = Path(job["out"]).with_suffix(".trials.csv")
    if table.exists():
        st.dataframe(pd.read_csv(table), width="stretch", key="tune_table")
    best = parse_yaml(result.get("best_recipe_yaml") or "{}", source="the best recipe") or {}
    st.markdown(f"Best trial {result.get('best_trial')}: dev score {result.get('best_score'):.3f} "
                f"({', '.join(f'{k} {v:.3f}' for k, v in (result.get('best_tasks') or {}).items())})")
    st.button("Use best", key="tune_use_best", on_click=_use_best,
              args=(best, method_name, global_names, model_names))


__all__ = ["tune_recipe", "tune_section"]
