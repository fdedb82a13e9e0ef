"""Safety repair: an aligned model and its fine-tune (the zoo's safety pair by default), a
repair method and its form; refusal vs own-task accuracy of the aligned model, the fine-tune and
the repaired model, the share of delta kept per matrix, the trade-off over the method's knob,
and an export of the repaired model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from engine import settings
from engine.errors import DeltaWorkbenchError
from engine.jobs import JobSpec
from engine.paths import resolve_user_path
from engine.repair.evaluate import knob_curve, repair_and_score, sweep_values
from engine.repair.registry import get_method, list_methods
from pages._forms import params_form
from pages._shared import (job_manager, new_export_folder, parameter_count, require_app,
                           short_name, show_error, zoo_manifest)

require_app("pages/safety_repair.py")
st.title("Safety repair")
st.caption("Give back the refusals fine-tuning took, keeping what it taught: Safe Delta, IRR "
           "and their baselines (measured on the zoo in bench/README.md, 'Safety repair').")

manifest = zoo_manifest()
zoo = settings.zoo_dir()
present = {m["path"] for m in manifest["models"]} if manifest else set()


def _default(path: str) -> str:
    return str(zoo / path) if path in present else ""


cols = st.columns(3)
aligned_text = cols[0].text_input("Aligned model", value=_default("safety/aligned"), key="sr_aligned")
finetuned_text = cols[1].text_input("Fine-tune", value=_default("safety/erased"), key="sr_finetuned")
unaligned_text = cols[2].text_input("Unaligned model (IRR, RESTA)", value=_default("safety/unaligned"),
                                    key="sr_unaligned")
names = list_methods()
method_name = st.selectbox("Method", names, key="sr_method")
method = get_method(method_name)
st.caption(method.paper)
with st.expander("Method parameters"):
    params = params_form(method.params_class, key=f"sr.{method_name}")
params = {k: v for k, v in params.items() if v not in ("", None)}

try:
    roots = settings.allowed_roots()
    aligned = str(resolve_user_path(aligned_text, roots, kind="dir"))
    finetuned = str(resolve_user_path(finetuned_text, roots, kind="dir"))
    needs_unaligned = "safety_vector" in method.stats
    unaligned = (str(resolve_user_path(unaligned_text, roots, kind="dir"))
                 if needs_unaligned and unaligned_text.strip() else None)
    method.parse_params(params)
except DeltaWorkbenchError as err:
    show_error(err, "Cannot repair")
    st.stop()

key = json.dumps([aligned, finetuned, unaligned, method_name, params], sort_keys=True)
digest = hashlib.sha256(key.encode()).hexdigest()[:12]
workdir = settings.workbench_home() / "repairs" / f"{Path(finetuned).name}-{method_name}-{digest}"

if parameter_count(finetuned, aligned) > settings.in_process_max_params():
    st.info(f"{short_name(finetuned)} is large: repair it as a job (the Jobs page follows it).")
    if st.button("Repair as a job", key="sr_job"):
        job_id = job_manager().submit(JobSpec(kind="repair", title=f"repair {method_name}", params={
            "aligned": aligned, "finetuned": finetuned, "unaligned": unaligned,
            "method": method_name, "params": params, "out": str(workdir / "model")}))
        st.success(f"Queued job {job_id}: follow it on the Jobs page.")
    st.stop()


@st.cache_data(show_spinner=False, max_entries=32)
def _measure(aligned, finetuned, unaligned, method_name, params_json, out) -> dict:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    return repair_and_score(aligned, finetuned, out, method_name, json.loads(params_json) or None,
                            unaligned=unaligned)


@st.cache_data(show_spinner=False, max_entries=16)
def _curve(aligned, finetuned, unaligned, method_name, params_json, workdir) -> list[dict]:
    return knob_curve(aligned, finetuned, workdir, method_name, json.loads(params_json) or None,
                      unaligned=unaligned)


params_json = json.dumps(params, sort_keys=True)
try:
    with st.spinner("Repairing and scoring..."):
        measured = _measure(aligned, finetuned, unaligned, method_name, params_json,
                            str(workdir / "model"))
except DeltaWorkbenchError as err:
    show_error(err, "Repair failed")
    st.stop()

for warning in measured["warnings"]:
    st.warning(warning)
tasks = measured["tasks"]
scores = measured["scores"]
own = tasks[1]
metrics = st.columns(3)
metrics[0].metric("Refusal (repaired)", f"{scores['repaired']['refuse']:.2f}",
                  f"{scores['repaired']['refuse'] - scores['fine-tune']['refuse']:+.2f} vs fine-tune")
metrics[1].metric(f"{own} (repaired)", f"{scores['repaired'][own]:.2f}",
                  f"{scores['repaired'][own] - scores['fine-tune'][own]:+.2f} vs fine-tune")
kept = measured["summary"].get("kept_share")
metrics[2].metric("Delta kept", "n/a" if kept is None else f"{kept:.1%}",
                  help="Share of the repaired matrices' delta entries that keep their fine-tuned value")

st.subheader("Refusal and task accuracy")
figure = go.Figure()
for label in ("aligned", "fine-tune", "repaired"):
    figure.add_bar(name=label, x=tasks, y=[scores[label][t] for t in tasks])
figure.update_layout(barmode="group", yaxis={"range": [0, 1.05]}, height=320, margin={"t": 20, "b": 20})
st.plotly_chart(figure, width="stretch", key="sr_scores")

report = measured["report"]
if report:
    st.subheader("Share of delta kept per matrix")
    frame = pd.DataFrame([{"matrix": n, **r} for n, r in report.items()])
    chart = go.Figure(go.Bar(x=frame["matrix"], y=frame["kept_share"]))
    chart.update_layout(yaxis={"range": [0, 1.05], "title": "kept share"}, height=340,
                        margin={"t": 20, "b": 140})
    st.plotly_chart(chart, width="stretch", key="sr_kept")
    with st.expander("Per-matrix report"):
        st.dataframe(frame, hide_index=True)

knob, values = sweep_values(method_name, params)
st.subheader(f"Trade-off over {knob}")
st.caption(f"One repair per value of {knob} ({', '.join(f'{v:g}' for v in values)}), the other "
           "parameters as above.")
if st.button(f"Sweep {knob}", key="sr_sweep") or st.session_state.get(f"sr_swept.{digest}"):
    st.session_state[f"sr_swept.{digest}"] = True
    try:
        with st.spinner(f"Repairing at every {knob}..."):
            points = _curve(aligned, finetuned, unaligned, method_name, params_json, str(workdir / "sweep"))
    except DeltaWorkbenchError as err:
        show_error(err, "Sweep failed")
        st.stop()
    curve = go.Figure()
    curve.add_scatter(x=[p["scores"][own] for p in points], y=[p["scores"]["refuse"] for p in points],
                      mode="lines+markers+text", name=method_name,
                      text=[f"{knob}={p['value']:g}" for p in points], textposition="top center")
    for label, symbol in (("aligned", "star"), ("fine-tune", "x")):
        curve.add_scatter(x=[scores[label][own]], y=[scores[label]["refuse"]], mode="markers",
                          name=label, marker={"symbol": symbol, "size": 12})
    curve.update_layout(xaxis={"title": f"{own} accuracy", "range": [-0.05, 1.05]},
                        yaxis={"title": "refusal", "range": [-0.05, 1.05]}, height=380,
                        margin={"t": 20})
    st.plotly_chart(curve, width="stretch", key="sr_curve")

st.subheader("Export")
name = st.text_input("Output folder name (in the export folder)", key="sr_export_name")
if st.button("Export the repaired model", key="sr_export"):
    try:
        out = new_export_folder(name)
        job_id = job_manager().submit(JobSpec(kind="repair", title=f"export repair {method_name}", params={
            "aligned": aligned, "finetuned": finetuned, "unaligned": unaligned,
            "method": method_name, "params": params, "out": str(out)}))
        st.success(f"Queued job {job_id}: the repaired model goes to {out}.")
    except DeltaWorkbenchError as err:
        show_error(err, "Export refused")
