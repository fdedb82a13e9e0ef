"""Similarity and conflicts: how the selected fine-tunes' task vectors relate: the task x task
cosine matrix, per-layer sign conflicts and top-k overlap of a pair, and the principal angles
between their top singular subspaces."""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from engine.analysis import AnalysisParams
from engine.analysis.similarity import PairParams
from engine.text import printable
from pages._analysis import (analysis_of_selection, layer_module_heatmap, matrix_heatmap, pair_frame,
                             per_layer_lines, tensor_order)
from pages._shared import require_app, require_selection, short_name

require_app("pages/similarity.py")
st.title("Similarity and conflicts")
st.caption("Task vectors that point the same way merge well; opposite signs on the entries that "
           "matter (sign conflicts) and disjoint important entries (low top-k overlap) are where "
           "merges lose accuracy.")

chosen = require_selection(2)
base, finetunes = chosen["base"], list(chosen["finetunes"])
labels = [short_name(p) for p in finetunes]

cols = st.columns(2)
density = cols[0].select_slider("Top-k density", options=[0.05, 0.1, 0.2, 0.3, 0.5, 1.0], value=0.2,
                                key="si_density",
                                help="Fraction of each task vector's largest entries compared for sign "
                                     "conflicts and overlap (TIES keeps 0.2).")
rank = cols[1].select_slider("Subspace rank r", options=[1, 2, 4, 8, 16, 32], value=8, key="si_rank",
                             help="Principal angles between the top-r left singular subspaces.")
params = AnalysisParams(pairs=PairParams(density=density, subspace_rank=rank))

result = analysis_of_selection(base, finetunes, params, title=f"Analyse {short_name(base)} + {len(finetunes)} fine-tunes (pairs)",
                               key="si", spinner="Comparing task vectors...")

# -- whole-model matrices ----------------------------------------------------------------------
st.subheader("Task x task")
models = result["models"]
n = len(labels)
conflict = [[0.0 if i == j else None for j in range(n)] for i in range(n)]
overlap = [[1.0 if i == j else None for j in range(n)] for i in range(n)]
for s in models["pairs"]:
    conflict[s["a"]][s["b"]] = conflict[s["b"]][s["a"]] = s["mean_sign_conflict"]
    overlap[s["a"]][s["b"]] = overlap[s["b"]][s["a"]] = s["mean_topk_jaccard"]
tabs = st.tabs(["Cosine", "Sign conflict", "Top-k overlap"])
with tabs[0]:
    st.plotly_chart(matrix_heatmap(models["cosine"], labels, labels, "Cosine of whole task vectors",
                                   zmin=-1, zmax=1, zmid=0), key="si_cosine")
with tabs[1]:
    st.plotly_chart(matrix_heatmap(conflict, labels, labels,
                                   f"Sign conflicts among the top {density:.0%} (mean over tensors)",
                                   zmin=0, zmax=1, colorscale="Reds"), key="si_conflict_matrix")
with tabs[2]:
    st.plotly_chart(matrix_heatmap(overlap, labels, labels,
                                   f"Top-{density:.0%} Jaccard overlap (mean over tensors)",
                                   zmin=0, zmax=1, colorscale="Blues"), key="si_overlap_matrix")

pairs = [s for s in models["pairs"] if s["cosine"] is not None]
if pairs:
    best = max(pairs, key=lambda s: s["cosine"])
    worst = max(pairs, key=lambda s: s["mean_sign_conflict"] or 0.0)
    st.caption(f"Most aligned: {labels[best['a']]} and {labels[best['b']]} (cosine {best['cosine']:.2f}). "
               f"Most conflicting: {labels[worst['a']]} and {labels[worst['b']]} "
               f"({(worst['mean_sign_conflict'] or 0):.0%} of top entries disagree in sign).")

# -- one pair, per layer ----------------------------------------------------------------------
st.subheader("One pair, per layer")
cols = st.columns(2)
first = cols[0].selectbox("Fine-tune A", labels, index=0, key="si_a")
second = cols[1].selectbox("Fine-tune B", [x for x in labels if x != first], index=0, key="si_b")
a, b = sorted([labels.index(first), labels.index(second)])
frame = pair_frame(result)
pair = frame[(frame["a"] == a) & (frame["b"] == b)]
matrices = pair[pair["layer"].notna() & pair["subspace_overlap"].notna()]
if pair.empty or matrices.empty:
    st.info("No per-layer matrices to compare for this pair.")
    st.stop()

tabs = st.tabs(["Sign conflict", "Top-k overlap", "Cosine", "Subspace angles"])
with tabs[0]:
    st.plotly_chart(per_layer_lines(matrices, "sign_conflict", f"Sign conflicts per layer, {first} vs {second}",
                                    color="module", y_title="fraction of top-k entries"), key="si_conflict")
    fig = layer_module_heatmap(matrices, "sign_conflict", "Sign conflict, layer x module", colorscale="Reds")
    if fig is not None:
        st.plotly_chart(fig, key="si_conflict_heat")
with tabs[1]:
    st.plotly_chart(per_layer_lines(matrices, "topk_jaccard", f"Top-k Jaccard overlap per layer, {first} vs {second}",
                                    color="module", y_title="Jaccard"), key="si_overlap")
with tabs[2]:
    st.plotly_chart(per_layer_lines(matrices, "cosine", f"Cosine per layer, {first} vs {second}",
                                    color="module", y_title="cosine"), key="si_layer_cosine")
with tabs[3]:
    fig = layer_module_heatmap(matrices, "subspace_overlap",
                               f"Subspace overlap (mean cos² of the {rank} principal angles; 1 = same)",
                               colorscale="Viridis")
    if fig is not None:
        st.plotly_chart(fig, key="si_subspace_heat")
    names = tensor_order(matrices["name"])
    name = st.selectbox("Tensor", names, key="si_tensor", format_func=printable)
    angles = matrices[matrices["name"] == name]["angles_deg"].iloc[0]
    fig = go.Figure(go.Bar(x=list(range(1, len(angles) + 1)), y=angles))
    fig.update_layout(title=f"Principal angles between the top-{rank} subspaces of {name}",
                      xaxis_title="angle index", yaxis_title="degrees", yaxis_range=[0, 90], height=320)
    st.plotly_chart(fig, key="si_angles")
    st.caption("0° means a shared direction, 90° an orthogonal one; random subspaces of a wide "
               "matrix sit near 90°.")
