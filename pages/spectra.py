"""Delta spectra: per-layer norms, top singular values, effective/stable rank and energy of the
selected fine-tunes' task vectors; a layer x module heatmap; one tensor's whole spectrum."""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from engine.analysis import AnalysisParams, tensor_spectrum
from engine.text import printable
from pages._analysis import (analysis_of_selection, guarded, layer_module_heatmap, module_order,
                             per_layer_lines, tensor_frame, tensor_order)
from pages._shared import require_app, require_selection, short_name

METRICS = {
    "rel_norm": "relative norm ||Δ|| / ||W0||",
    "fro_norm": "Frobenius norm ||Δ||",
    "s1": "top singular value s1",
    "effective_rank": "effective rank",
    "stable_rank": "stable rank",
    "energy_k_50": "k for 50% energy",
    "energy_k_90": "k for 90% energy",
    "energy_k_99": "k for 99% energy",
    "sparsity": "sparsity",
    "kurtosis": "excess kurtosis",
}

require_app("pages/spectra.py")
st.title("Delta spectra")
st.caption("Each fine-tune's task vector Δ = W_ft − W_base, tensor by tensor: how large it is, "
           "how many directions carry its energy, and where in the network it sits.")

chosen = require_selection(1)
base, finetunes = chosen["base"], list(chosen["finetunes"])
labels = [short_name(p) for p in finetunes]
params = AnalysisParams()

result = analysis_of_selection(base, finetunes, params, title=f"Analyse {short_name(base)} + {len(finetunes)} fine-tune(s)",
                               key="sp", spinner="Computing delta spectra...")

frame = tensor_frame(result)
matrices = frame[frame["s1"].notna()]
if matrices.empty:
    st.info("These models have no matrix whose task vector could be analysed.")
    st.stop()
cache = result.get("cache", {})
st.caption(f"{short_name(base)} · {len(finetunes)} fine-tune(s) · {frame['name'].nunique()} tensors · "
           f"metric cache: {cache.get('hits', 0)} hits, {cache.get('misses', 0)} computed")

# -- per-layer charts --------------------------------------------------------------------------
st.subheader("Per layer")
modules = module_order(matrices[matrices["layer"].notna()]["module"])
top = st.columns([2, 3])
module = top[0].selectbox("Module", ["all (mean)", *modules], key="sp_module",
                          help="Which weight of each layer; 'all' averages the layer's matrices.")
shown = top[1].multiselect("Fine-tunes", labels, default=labels, key="sp_finetunes")
layer_rows = matrices[matrices["finetune"].isin(shown)]
if module != "all (mean)":
    layer_rows = layer_rows[layer_rows["module"] == module]
if layer_rows.empty or layer_rows["layer"].isna().all():
    st.info("No per-layer matrices for this choice.")
else:
    tabs = st.tabs(["Relative norm", "Top singular values", "Effective / stable rank", "Energy k"])
    with tabs[0]:
        st.plotly_chart(per_layer_lines(layer_rows, "rel_norm", "||Δ|| / ||W0|| per layer",
                                        y_title="relative norm"), key="sp_rel_norm")
    with tabs[1]:
        st.plotly_chart(per_layer_lines(layer_rows, "s1", "Largest singular value per layer",
                                        y_title="s1"), key="sp_s1")
        one = st.selectbox("Top singular values of", shown or labels, key="sp_top_ft")
        fig = go.Figure()
        picked = layer_rows[(layer_rows["finetune"] == one) & layer_rows["layer"].notna()]
        for _, row in picked.sort_values(["layer", "module"]).iterrows():
            values = row["top_singular_values"]
            fig.add_trace(go.Scatter(x=list(range(1, len(values) + 1)), y=values, mode="lines+markers",
                                     name=f"L{int(row['layer'])} {row['module']}"))
        fig.update_layout(title=f"Top singular values, {one}", xaxis_title="index",
                          yaxis_title="singular value", yaxis_type="log", height=360)
        st.plotly_chart(fig, key="sp_top_values")
    with tabs[2]:
        rank = layer_rows.melt(id_vars=["finetune", "layer"], value_vars=["effective_rank", "stable_rank"],
                               var_name="kind", value_name="rank")
        rank["series"] = rank["finetune"] + " · " + rank["kind"].str.replace("_rank", "")
        st.plotly_chart(per_layer_lines(rank, "rank", "Effective and stable rank per layer", color="series",
                                        y_title="rank"), key="sp_rank")
    with tabs[3]:
        level = st.radio("Energy level", ["50", "90", "99"], index=1, horizontal=True, key="sp_energy")
        st.plotly_chart(per_layer_lines(layer_rows, f"energy_k_{level}",
                                        f"Smallest k holding {level}% of ||Δ||² per layer",
                                        y_title="k"), key="sp_energy_chart")

# -- heatmap layer x module -------------------------------------------------------------------
st.subheader("Layer x module")
cols = st.columns(2)
metric = cols[0].selectbox("Metric", list(METRICS), format_func=METRICS.get, key="sp_heat_metric")
heat_ft = cols[1].selectbox("Fine-tune", labels, key="sp_heat_ft")
figure = layer_module_heatmap(matrices[matrices["finetune"] == heat_ft], metric,
                              f"{METRICS[metric]} · {heat_ft}", clickable=True)
if figure is None:
    st.info("No per-layer tensors to map.")
else:
    event = st.plotly_chart(figure, key="sp_heatmap", on_select="rerun", selection_mode="points")
    points = (getattr(event, "selection", None) or {}).get("points", []) if event is not None else []
    clicked = (heat_ft, points[0].get("x"), points[0].get("y")) if points else None
    if clicked and clicked != st.session_state.get("sp_heat_clicked"):  # a click opens that tensor below
        st.session_state["sp_heat_clicked"] = clicked
        hit = matrices[(matrices["layer"] == points[0].get("y")) & (matrices["module"] == points[0].get("x"))]
        if not hit.empty:
            st.session_state["sp_tensor"] = hit["name"].iloc[0]
            st.session_state["sp_tensor_ft"] = heat_ft

with st.expander("All metrics (table)"):
    columns = ["finetune", "name", "shape", "fro_norm", "rel_norm", "s1", "effective_rank", "stable_rank",
               "energy_k_50", "energy_k_90", "energy_k_99", "sparsity", "kurtosis", "nan_count",
               "inf_count", "spectrum"]
    st.dataframe(frame[[c for c in columns if c in frame]], hide_index=True, width="stretch")

# -- one tensor -------------------------------------------------------------------------------
st.subheader("One tensor")
names = tensor_order(matrices["name"])
if st.session_state.get("sp_tensor") not in names:
    st.session_state.pop("sp_tensor", None)
if st.session_state.get("sp_tensor_ft") not in labels:
    st.session_state.pop("sp_tensor_ft", None)
cols = st.columns([3, 1])
name = cols[0].selectbox("Tensor", names, key="sp_tensor", format_func=printable,
                         help="Or click a cell of the heatmap above.")
which = cols[1].selectbox("Fine-tune", labels, key="sp_tensor_ft")
folder = finetunes[labels.index(which)]


@st.cache_data(show_spinner=False, max_entries=64)
def _spectrum(base: str, finetuned: str, name: str, stamp: tuple) -> dict:  # noqa: ARG001 - stamp keys the cache
    return tensor_spectrum(base, finetuned, name)


def _stamp(*paths: str) -> tuple:
    from engine.io import ModelFolder
    from engine.lora import LoraAdapter, is_adapter_folder

    prints = []
    for path in paths:
        with (LoraAdapter(path) if is_adapter_folder(path) else ModelFolder(path)) as f:
            prints.append(tuple(sorted((k, v["size"], v["mtime_ns"]) for k, v in f.file_fingerprints().items())))
    return tuple(prints)


spectrum = guarded("The tensor's spectrum failed",
                   lambda: _spectrum(base, folder, name, _stamp(base, folder)))
if spectrum is not None and spectrum.get("values"):
    values = spectrum["values"]
    row = matrices[(matrices["name"] == name) & (matrices["finetune"] == which)].iloc[0]
    m = st.columns(4)
    m[0].metric("shape", "x".join(str(s) for s in spectrum["shape"]))
    m[1].metric("||Δ||", f"{spectrum['fro_norm']:.4g}")
    m[2].metric("effective rank", f"{row['effective_rank']:.3g}")
    m[3].metric("stable rank", f"{row['stable_rank']:.3g}")
    left, right = st.columns(2)
    fig = go.Figure(go.Scatter(x=list(range(1, len(values) + 1)), y=values, mode="lines"))
    fig.update_layout(title=f"Singular values ({spectrum['method']})", xaxis_title="index",
                      yaxis_title="singular value", yaxis_type="log", height=340)
    left.plotly_chart(fig, key="sp_one_values")
    energy = spectrum["cumulative_energy"]
    fig = go.Figure(go.Scatter(x=list(range(1, len(energy) + 1)), y=energy, mode="lines", name="energy"))
    for level, dash in ((0.5, "dot"), (0.9, "dash"), (0.99, "dashdot")):
        fig.add_hline(y=level, line_dash=dash, annotation_text=f"{level:.0%}")
    fig.update_layout(title="Cumulative energy Σ s_j² / ||Δ||²", xaxis_title="k", yaxis_title="energy",
                      yaxis_range=[0, 1.02], height=340)
    right.plotly_chart(fig, key="sp_one_energy")
    if spectrum["method"] == "randomized":
        st.caption("Large matrix: only the top singular values are computed (randomized SVD); the "
                   "energy curve stops where they do.")
elif spectrum is not None:
    st.info("This tensor is not a matrix: it has no spectrum.")
