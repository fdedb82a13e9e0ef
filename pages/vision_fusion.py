"""Vision fusion: pick LLaVA members of one LM family (the zoo's mllm family by default), a
merge method, its parameters and the per-member weights; see each member's accuracy per vision
task, their plain concatenation over an unmerged LM, and the fused model (VisionFuse), with
sample images and every model's answer."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from engine import settings
from engine.errors import DeltaWorkbenchError
from engine.merge.registry import get_method, list_methods
from engine.paths import resolve_user_path
from engine.visionfuse.compare import compare
from engine.visionfuse.weights import default_weights
from pages._forms import params_form
from pages._shared import require_app, show_error, zoo_manifest

require_app("pages/vision_fusion.py")
st.title("Vision fusion")
st.caption("VisionFuse: multimodal models sharing one LM fused without training: their LM "
           "deltas merged, their encoders' visual tokens concatenated (bench/README.md, "
           "'VisionFuse').")

manifest = zoo_manifest()
zoo = settings.zoo_dir()
present = {m["path"] for m in manifest["models"]} if manifest else set()


def _default(path: str) -> str:
    return str(zoo / path) if path in present else ""


base_text = st.text_input("Shared LM (base)", value=_default("small/base"), key="vf_base")
cols = st.columns(2)
first = cols[0].text_input("Member 1", value=_default("mllm/top"), key="vf_m1")
second = cols[1].text_input("Member 2", value=_default("mllm/bottom"), key="vf_m2")
methods = [m for m in list_methods() if get_method(m).requires_base or get_method(m).optional_base]
method_name = st.selectbox("Merge method (language models only)", methods,
                           index=methods.index("task_arithmetic") if "task_arithmetic" in methods
                           else 0, key="vf_method")
method = get_method(method_name)
with st.expander("Method parameters"):
    params = params_form(method.params_class, key=f"vf.{method_name}")
params = {k: v for k, v in params.items() if v not in ("", None)}
wcols = st.columns(2)
start = default_weights(method_name, 2)[0]
weights = [wcols[0].number_input("Weight, member 1", value=float(start), step=0.1, key="vf_w1"),
           wcols[1].number_input("Weight, member 2", value=float(start), step=0.1, key="vf_w2")]
n = st.slider("Held-out images per task", 8, 128, 32, step=8, key="vf_n")

if not (base_text.strip() and first.strip() and second.strip()):
    st.info("Give the shared LM and two members (the zoo's mllm family appears here once the "
            "zoo is built).")
    st.stop()

try:
    roots = settings.allowed_roots()
    paths = [str(resolve_user_path(p, roots, kind="dir")) for p in (base_text, first, second)]
    method.parse_params(params)
except DeltaWorkbenchError as err:
    show_error(err, "Cannot fuse")
    st.stop()


@st.cache_data(show_spinner="Fusing and scoring ...", max_entries=8)
def _compare(base, m1, m2, method_name, params_items, weights, n):
    return compare(base, [m1, m2], method_name, dict(params_items), list(weights), n)


try:
    result = _compare(paths[0], paths[1], paths[2], method_name, tuple(sorted(params.items())),
                      tuple(weights), n)
except DeltaWorkbenchError as err:
    show_error(err, "Cannot fuse")
    st.stop()

rows = result["rows"]
tasks = list(rows[0]["tasks"])
metric_cols = st.columns(len(rows))
for col, row in zip(metric_cols, rows):
    mean = sum(row["tasks"][t]["accuracy"] for t in tasks) / len(tasks)
    col.metric(row["label"], f"{mean:.2f}")
fig = go.Figure()
for row in rows:
    fig.add_bar(name=row["label"], x=tasks, y=[row["tasks"][t]["accuracy"] for t in tasks])
fig.update_layout(barmode="group", yaxis_title="exact match", yaxis_range=[0, 1], height=320,
                  margin=dict(l=10, r=10, t=30, b=10))
st.plotly_chart(fig, use_container_width=True)
st.dataframe(pd.DataFrame([{"model": r["label"], **{f"{t}": r["tasks"][t]["accuracy"]
                                                    for t in tasks},
                            **{f"{t} letters": r["tasks"][t]["char_accuracy"] for t in tasks}}
                           for r in rows]), hide_index=True)

st.subheader("Sample images (ocr)")
for sample in result["samples"]:
    img_col, ans_col = st.columns([2, 3])
    heat = go.Figure(go.Heatmap(z=sample["image"], colorscale="gray", showscale=False))
    heat.update_layout(height=140, margin=dict(l=0, r=0, t=0, b=0),
                       yaxis=dict(autorange="reversed", visible=False), xaxis=dict(visible=False))
    img_col.plotly_chart(heat, use_container_width=True)
    ans_col.markdown(f"**{sample['string']}**  \n" + "  \n".join(
        f"{label}: `{answer or '(empty)'}`" for label, answer in sample["answers"].items()))
