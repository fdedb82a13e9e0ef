"""Compression lab: compress one fine-tune's delta with a chosen method and ratio, see the
ratio in bytes on disk, the reconstruction error per tensor and the rebuilt model's task
accuracy; and the measured quality-vs-ratio curves of every method on the zoo."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from engine import settings
from engine.compress import compress, folder_bytes, get_method, list_methods
from engine.compress.report import measure_rebuilt
from engine.compress.scope import artifact_summary
from engine.errors import DeltaWorkbenchError
from engine.jobs import JobSpec
from pages._forms import params_form
from pages._shared import (require_app, human_bytes, job_manager, parameter_count, require_selection,
                           scoring, short_name, show_error)

QUALITY_FIGURE = Path(__file__).resolve().parents[1] / "bench" / "results" / "compress_quality.json"

require_app("pages/compression_lab.py")
st.title("Compression lab")
chosen = require_selection(1)
base = chosen["base"]
SCORED_ON = json.dumps(scoring(base))  # zoo tasks and/or the registered eval files

names = list_methods()
top = st.columns([2, 2, 1])
finetuned = top[0].selectbox("Fine-tune", chosen["finetunes"], format_func=short_name,
                             key="cl_finetune")
method_name = top[1].selectbox("Method", names, index=names.index("delta_dct")
                               if "delta_dct" in names else 0, key="cl_method")
ratio = top[2].select_slider("Target ratio", [2, 4, 8, 16, 32, 64], value=8, key="cl_ratio")
method = get_method(method_name)
st.caption(method.paper)
PAPER_DEFAULTS = "paper defaults"
preset = st.radio("Parameters", [PAPER_DEFAULTS, *method.presets], horizontal=True,
                  key=f"cl_preset.{method_name}",
                  help="A preset is a parameter set measured in bench/README.md (e.g. tuned for "
                       "small models); the form below starts from it.")
with st.expander("Method parameters (those the ratio solves are left out)"):
    params = params_form(method.params_class, key=f"cl.{method_name}.{preset}",
                         defaults=method.presets.get(preset), skip=tuple(method.solved))
params = {k: v for k, v in params.items() if v not in ("", None)}


def _artifact_dir(base: str, finetuned: str, method: str, ratio: float, params: dict) -> Path:
    key = json.dumps([base, finetuned, method, ratio, params], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return settings.workbench_home() / "artifacts" / f"{Path(finetuned).name}-{method}-{ratio}x-{digest}"


out = _artifact_dir(base, finetuned, method_name, float(ratio), params)
n_params = parameter_count(finetuned, base)
if n_params > settings.in_process_max_params():  # one setting for every page
    st.info(f"{short_name(finetuned)} has {n_params:,} parameters: compress it as a job.")
    if st.button("Compress as a job", key="cl_job"):
        job_id = job_manager().submit(JobSpec(kind="compress", title=f"compress {method_name}",
                                              params={"base": base, "finetuned": finetuned,
                                                      "method": method_name, "ratio": ratio,
                                                      "params": params, "out": str(out)}))
        st.success(f"Queued job {job_id}: follow it on the Jobs page.")
    st.stop()


@st.cache_data(show_spinner=False, max_entries=64)
def _compress_and_measure(base: str, finetuned: str, method: str, ratio: float, params_json: str,
                          out: str, n_eval: int, scored_on_json: str) -> dict:
    if not (Path(out) / "manifest.json").exists():
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        compress(base, finetuned, out, method, ratio=ratio, params=json.loads(params_json) or None,
                 allowed_roots=settings.allowed_roots())
    size = folder_bytes(out)
    entries = parameter_count(finetuned, base)
    on = json.loads(scored_on_json)
    summary = artifact_summary(out)
    return {"bytes": size, "ratio": 2 * entries / size, "artifact": out,
            "ratio_compressed": summary["compressed_set"], "scope": summary["scope"],
            "warnings": summary["warnings"],
            **measure_rebuilt(out, base, finetuned, tasks=on["tasks"], n_per_task=n_eval,
                              eval_sets=_eval_sets(on))}


def _eval_sets(on: dict):
    from engine.evaluate.own_data import heldout_sets

    return heldout_sets(on["eval_files"], on["tasks"])


@st.cache_data(show_spinner=False, max_entries=32)
def _original_accuracy(folder: str, base: str, n_eval: int, scored_on_json: str) -> dict:
    from engine.evaluate import evaluate_folder

    on = json.loads(scored_on_json)
    return evaluate_folder(folder, tasks=on["tasks"], n_per_task=n_eval, n_generic=0, base=base,
                           eval_sets=_eval_sets(on))


try:
    with st.spinner("Compressing, rebuilding and scoring..."):
        measured = _compress_and_measure(base, finetuned, method_name, float(ratio),
                                         json.dumps(params, sort_keys=True), str(out), 64, SCORED_ON)
        original = _original_accuracy(finetuned, base, 64, SCORED_ON)
except DeltaWorkbenchError as err:
    show_error(err, "Compression failed")
    st.stop()

for warning in measured["warnings"]:
    st.warning(warning)
cols = st.columns(4)
cols[0].metric("Ratio on disk", f"{measured['ratio']:.1f}x", help="2 bytes x delta entries / "
               "bytes of the artifact folder (manifest and every file counted)")
compressed = measured["ratio_compressed"]
cols[1].metric("Ratio, compressed set", "n/a" if compressed is None else f"{compressed:.1f}x",
               help=f"scope {measured['scope']}: 2 bytes x the compressed matrices' entries / "
                    "bytes of their sections (the papers' convention: no manifest, no 1-D or "
                    "fp16-kept tensors)")
cols[2].metric("Artifact size", human_bytes(measured["bytes"]))
errors = pd.DataFrame(measured["errors"])
cols[3].metric("Median relative error", f"{errors['rel_error'].median():.3f}")

st.subheader("Task accuracy: original vs rebuilt")
tasks = list(original["tasks"])
figure = go.Figure()
figure.add_bar(name="fine-tune", x=tasks, y=[original["tasks"][t]["accuracy"] for t in tasks])
figure.add_bar(name=f"rebuilt ({method_name}, {ratio}x)", x=tasks,
               y=[measured["accuracy"]["tasks"][t]["accuracy"] for t in tasks])
figure.update_layout(barmode="group", yaxis={"range": [0, 1.05]}, height=320,
                     margin={"t": 20, "b": 20})
st.plotly_chart(figure, width="stretch", key="cl_accuracy")

st.subheader("Reconstruction error per tensor")
matrices = errors[errors["shape"].map(len) == 2]
error_chart = go.Figure(go.Bar(x=matrices["tensor"], y=matrices["rel_error"]))
error_chart.update_layout(yaxis={"title": "||d_hat - d|| / ||d||"}, height=340,
                          margin={"t": 20, "b": 120})
st.plotly_chart(error_chart, width="stretch", key="cl_errors")

st.subheader("Quality vs ratio on the zoo (measured)")
if QUALITY_FIGURE.is_file():
    st.plotly_chart(go.Figure(json.loads(QUALITY_FIGURE.read_text())), width="stretch",
                    key="cl_quality")
    st.caption("From `bench/compress_quality.py` on the full zoo; see bench/README.md.")
else:
    st.info("No measured quality curves yet: run `python bench/compress_quality.py --zoo ZOO`.")
