"""Merge lab: pick a method, tune its parameters and per-model weights, and see the merged
model's accuracy on every zoo task within seconds (merged and scored in memory, nothing
written). Keep runs to compare them; save the recipe as mergekit YAML or run it as a job."""

from __future__ import annotations

import json

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from engine.errors import DeltaWorkbenchError
from engine.jobs import JobSpec
from engine.merge import default_method, get_method, list_methods
from engine.merge.whatif import get_session
from engine.recipe import parse_recipe
from pages._forms import float_fields, params_form
from pages._moe_section import moe_section
from pages._tune_section import tune_section
from pages._shared import (require_app, job_manager, new_export_folder, require_selection, scoring,
                           short_name, show_error)

RUNS_KEY = "merge_runs"

require_app("pages/merge_lab.py")
st.title("Merge lab")
chosen = require_selection(1)
base, finetunes = chosen["base"], list(chosen["finetunes"])
SCORED_ON = json.dumps(scoring(base))  # zoo tasks and/or the registered eval files

names = list_methods()
top = st.columns([2, 1])
method_name = top[0].selectbox("Method", names, index=names.index(default_method()),
                               key="ml_method")
n_eval = top[1].number_input("Held-out examples per task", 8, 256, 48, step=8, key="ml_n_eval",
                             help="More is steadier and slower.")
method = get_method(method_name)
st.caption(f"{method.paper}")
if method.max_models is not None and len(finetunes) > method.max_models:
    kept = ", ".join(short_name(f) for f in finetunes[:method.max_models])
    st.info(f"{method_name} merges at most {method.max_models} fine-tune(s) with the base: only "
            f"the first selected ({kept}) {'is' if method.max_models == 1 else 'are'} used.")
    finetunes = finetunes[:method.max_models]

with st.expander("Method parameters", expanded=True):
    params = params_form(method.params_class, key=f"ml.{method_name}")
model_params: list[dict] = []
if method.model_params_class.model_fields:
    st.markdown("**Per-model parameters**")
    columns = st.columns(min(len(finetunes), 5))
    default_weight = method.starting_weight(len(finetunes))
    for i, folder in enumerate(finetunes):
        with columns[i % len(columns)]:
            st.caption(short_name(folder))
            model_params.append(params_form(method.model_params_class,
                                            key=f"ml.{method_name}.{i}",
                                            defaults={"weight": default_weight}))
else:
    model_params = [{} for _ in finetunes]


def _session(base: str, finetunes: tuple[str, ...], n_eval: int, scored_on_json: str):
    on = json.loads(scored_on_json)
    return get_session(base, list(finetunes), n_per_task=n_eval, n_generic=0, tasks=on["tasks"],
                       eval_files=tuple(on["eval_files"]))


@st.cache_data(show_spinner=False, max_entries=256)
def _evaluate(base: str, finetunes: tuple[str, ...], method: str, model_params_json: str,
              params_json: str, n_eval: int, scored_on_json: str) -> dict:
    session = _session(base, finetunes, n_eval, scored_on_json)
    return session.evaluate(method, json.loads(model_params_json), json.loads(params_json))


@st.cache_data(show_spinner=False, max_entries=64)
def _evaluate_input(base: str, finetunes: tuple[str, ...], which: str, n_eval: int,
                    scored_on_json: str) -> dict:
    session = _session(base, finetunes, n_eval, scored_on_json)
    return session.evaluate_input(which if which == "base" else int(which))


def _accuracies(result: dict) -> dict[str, float]:
    return {task: score["accuracy"] for task, score in result["tasks"].items()}


try:
    with st.spinner("Merging in memory and scoring..."):
        result = _evaluate(base, tuple(finetunes), method_name, json.dumps(model_params),
                           json.dumps(params), int(n_eval), SCORED_ON)
        references = {"base": _accuracies(_evaluate_input(base, tuple(finetunes), "base",
                                                          int(n_eval), SCORED_ON))}
        for i, folder in enumerate(finetunes):
            references[short_name(folder)] = _accuracies(
                _evaluate_input(base, tuple(finetunes), str(i), int(n_eval), SCORED_ON))
except DeltaWorkbenchError as err:
    show_error(err, "This merge cannot run")
    st.stop()
except ValueError as err:  # pydantic validation of a parameter
    st.error(f"Invalid parameters: {err}".splitlines()[0])
    st.stop()

merged = _accuracies(result)
own = {name: scores for name, scores in references.items() if name != "base"}
st.subheader("Accuracy per task")
metrics = st.columns(3)
own_tasks = [t for t in merged if any(name.endswith(t) for name in own)]
if own_tasks:
    metrics[0].metric("Mean over the fine-tunes' tasks",
                      f"{sum(merged[t] for t in own_tasks) / len(own_tasks):.3f}")
metrics[1].metric("Merge time", f"{result['seconds']['merge']:.2f} s")
metrics[2].metric("Evaluation time", f"{result['seconds']['evaluate']:.2f} s")
for warning in result.get("warnings", []):
    st.warning(warning)

figure = go.Figure()
tasks = list(merged)
figure.add_bar(name=f"merged ({method_name})", x=tasks, y=[merged[t] for t in tasks])
figure.add_bar(name="base", x=tasks, y=[references["base"][t] for t in tasks], opacity=0.5)
best = {t: max(own[name][t] for name in own) for t in tasks}
figure.add_scatter(name="best fine-tune", x=tasks, y=[best[t] for t in tasks], mode="markers",
                   marker={"symbol": "line-ew-open", "size": 28, "line": {"width": 3}})
figure.update_layout(barmode="group", yaxis={"range": [0, 1.05], "title": "exact match"},
                     height=380, margin={"t": 20, "b": 20})
st.plotly_chart(figure, width="stretch", key="ml_chart")

# -- sweep one parameter -----------------------------------------------------------------------
SWEEP_POINTS = 9


def sweep_values(low, high, default) -> list[float]:
    """Nine values across a bounded range, else multiples of the default (or of 1)."""
    if low is not None and high is not None:
        return [low + (high - low) * i / (SWEEP_POINTS - 1) for i in range(SWEEP_POINTS)]
    centre = default if default not in (None, 0) else 1.0
    return [centre * f for f in (0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)]


with st.expander("Sweep one parameter"):
    choices = {f"{alias}": ("global", alias, low, high, default)
               for alias, low, high, default in float_fields(method.params_class)}
    choices.update({f"{alias} (every model)": ("model", alias, low, high, default)
                    for alias, low, high, default in float_fields(method.model_params_class)})
    if not choices:
        st.caption(f"{method_name} has no numeric parameter to sweep.")
    else:
        sweep_label = st.selectbox("Parameter", list(choices), key=f"ml_sweep_param.{method_name}")
        scope, alias, low, high, default = choices[sweep_label]
        values = sweep_values(low, high, default)
        st.caption("Values: " + ", ".join(f"{v:.3g}" for v in values) + " (everything else as set above).")
        sweep_key = f"ml_sweep.{method_name}.{sweep_label}"
        if st.button("Run the sweep", key="ml_sweep_run"):
            rows = []
            try:
                with st.spinner(f"{len(values)} merges in memory..."):
                    for value in values:
                        if scope == "global":
                            p_, mp_ = {**params, alias: value}, model_params
                        else:
                            p_, mp_ = params, [{**m, alias: value} for m in model_params]
                        scores = _accuracies(_evaluate(base, tuple(finetunes), method_name,
                                                       json.dumps(mp_), json.dumps(p_), int(n_eval),
                                                       SCORED_ON))
                        rows.append({"value": value, **scores})
                st.session_state[sweep_key] = rows
            except (DeltaWorkbenchError, ValueError) as err:
                show_error(err, "The sweep stopped")
        rows = st.session_state.get(sweep_key)
        if rows:
            sweep = go.Figure()
            shown = own_tasks or [t for t in rows[0] if t != "value"]
            for task in shown:
                sweep.add_scatter(x=[r["value"] for r in rows], y=[r[task] for r in rows],
                                  mode="lines+markers", name=task)
            sweep.add_scatter(x=[r["value"] for r in rows],
                              y=[sum(r[t] for t in shown) / len(shown) for r in rows],
                              mode="lines", name="mean", line={"width": 4, "dash": "dot"})
            sweep.update_layout(xaxis={"title": sweep_label}, yaxis={"range": [0, 1.05],
                                "title": "exact match"}, height=340, margin={"t": 20, "b": 20})
            st.plotly_chart(sweep, width="stretch", key="ml_sweep_chart")
            best_row = max(rows, key=lambda r: sum(r[t] for t in shown))
            st.caption(f"Best mean at {sweep_label} = {best_row['value']:.3g}.")

# -- compare runs ------------------------------------------------------------------------------
runs = st.session_state.setdefault(RUNS_KEY, [])
label = st.text_input("Run label", value=f"{method_name} #{len(runs) + 1}", key="ml_label")
if st.button("Keep this run for comparison", key="ml_keep"):
    runs.append({"label": label, "method": method_name, "params": params,
                 "model_params": model_params, "accuracy": merged})
if runs:
    st.subheader("Kept runs")
    table = pd.DataFrame([{"run": r["label"], **r["accuracy"]} for r in runs]).set_index("run")
    st.dataframe(table.style.format("{:.3f}"), width="stretch")
    compare = go.Figure()
    for r in runs:
        compare.add_bar(name=r["label"], x=list(r["accuracy"]), y=list(r["accuracy"].values()))
    compare.update_layout(barmode="group", yaxis={"range": [0, 1.05]}, height=320,
                          margin={"t": 20, "b": 20})
    st.plotly_chart(compare, width="stretch", key="ml_compare")
    if st.button("Clear kept runs", key="ml_clear"):
        runs.clear()
        st.rerun()

# -- recipe and full merge ---------------------------------------------------------------------
st.subheader("Recipe")
recipe_data = {
    "merge_method": method_name,
    "base_model": base,
    "models": [{"model": f, "parameters": mp} for f, mp in zip(finetunes, model_params)],
    "parameters": params,
    "dtype": "float32",
}
try:
    recipe_yaml = parse_recipe(recipe_data).to_yaml()
except DeltaWorkbenchError as err:
    show_error(err, "Recipe")
    st.stop()
st.code(recipe_yaml, language="yaml")
st.download_button("Download recipe (mergekit YAML)", recipe_yaml, file_name="merge_recipe.yml",
                   mime="application/x-yaml", key="ml_download")
with st.form("ml_run_form"):
    out_name = st.text_input("Output folder name (under the export folder)",
                             value=f"merge-{method_name}", key="ml_out_name")
    if st.form_submit_button("Run the full merge as a job"):
        try:
            out = new_export_folder(out_name)
            job_id = job_manager().submit(JobSpec(
                kind="merge", title=f"merge {method_name} -> {out_name}",
                params={"recipe_yaml": recipe_yaml, "out": str(out)}))
            st.success(f"Queued job {job_id}: follow it on the Jobs page.")
        except DeltaWorkbenchError as err:
            show_error(err, "Cannot run the merge")

# -- automatic tuning ---------------------------------------------------------------------------
tune_section(method, base, finetunes, params, model_params)

# -- mixture of experts -------------------------------------------------------------------------
moe_section(base, list(chosen["finetunes"]))
