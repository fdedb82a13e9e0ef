"""Neural incompatibility: how similar two models of different width and depth are, layer by
layer: linear CKA of their hidden states on the same probe prompts, and a basis-invariant
similarity of their weights read through the shared token embeddings (after LaTen)."""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from engine import settings
from engine.analysis.incompatibility import IncompatibilityParams, incompatibility_maps
from pages._analysis import matrix_heatmap, metrics_of
from pages._shared import require_app, selection, short_name, zoo_manifest

require_app("pages/incompatibility.py")
st.title("Neural incompatibility")
st.caption("Can knowledge move between model sizes by copying parameters? LaTen (Tan et al., ACL "
           "2025) finds that models of different scale agree little, layer for layer, in what they "
           "compute and in their weights. These maps show it for two models you pick; by default the "
           "demo zoo's small and large bases.")

manifest = zoo_manifest()
if manifest is None:
    st.info("No demo zoo yet: build it on the Models page. This page compares two of its model "
            "families (small and large).")
    st.stop()
zoo = settings.zoo_dir()
entries = {str(zoo / m["path"]): m for m in manifest["models"]}
chosen = selection()
options = list(dict.fromkeys([*entries, *[p for p in [chosen.get("base"), *chosen.get("finetunes", [])] if p]]))


def _default(family: str, fallback: int) -> int:
    for i, path in enumerate(options):
        m = entries.get(path)
        if m and m["family"] == family and m["role"] == "base":
            return i
    return min(fallback, len(options) - 1)


if len(options) < 2:
    st.info("The zoo needs two models to compare.")
    st.stop()
cols = st.columns([2, 2, 1])
path_a = cols[0].selectbox("Model A (rows)", options, index=_default("small", 0), format_func=short_name,
                           key="ni_a")
path_b = cols[1].selectbox("Model B (columns)", options, index=_default("large", 1), format_func=short_name,
                           key="ni_b")
n_per_task = cols[2].number_input("Probes per task", 1, 64, 8, key="ni_probes",
                                  help="Held-out prompts of every zoo task run through both models.")
parent_a = entries.get(path_a, {}).get("parent")
parent_b = entries.get(path_b, {}).get("parent")
can_deltas = bool(parent_a and parent_b)
use_deltas = st.checkbox("Compare task vectors (fine-tune minus its base) instead of weights",
                         value=False, disabled=not can_deltas, key="ni_deltas",
                         help="Both models must be zoo fine-tunes.") and can_deltas
if path_a == path_b:
    st.info("Pick two different models: a model compared with itself is trivially similar.")
    st.stop()

params = IncompatibilityParams(n_per_task=int(n_per_task))
base_a = str(zoo / parent_a) if use_deltas else None
base_b = str(zoo / parent_b) if use_deltas else None
job_spec = {"model_a": path_a, "model_b": path_b, "base_a": base_a, "base_b": base_b,
            "params": params.model_dump(mode="json")}
maps = metrics_of(
    [path_a, path_b],
    lambda cache: incompatibility_maps(path_a, path_b, params, base_a=base_a, base_b=base_b, cache=cache),
    job_params={"incompatibility": job_spec},
    title=f"Incompatibility maps {short_name(path_a)} vs {short_name(path_b)}", key="ni",
    spinner="Running the probe prompts through both models...", failed="The incompatibility maps failed")

name_a, name_b = short_name(path_a), short_name(path_b)
act, par = maps["activation"], maps["parameters"]
cka = act["cka"]
rows_a = ["emb"] + [f"L{i - 1}" for i in range(1, len(cka))]
cols_b = ["emb"] + [f"L{j - 1}" for j in range(1, len(cka[0]) if cka else 1)]

# -- activation map -----------------------------------------------------------------------------
st.subheader("Hidden-state similarity (linear CKA)")
st.caption(f"{act['probes']} probe prompts, {act['samples']} {act['rows']} as samples; width "
           f"{act['width_a']} ({name_a}) vs {act['width_b']} ({name_b}). 'emb' is the embedding output, "
           "L<k> the output of block k (the tensors named layers.k).")
st.plotly_chart(matrix_heatmap(cka, cols_b, rows_a, f"CKA: {name_a} (rows) vs {name_b} (columns)",
                               zmin=0, zmax=1, colorscale="Viridis", x_title=name_b, y_title=name_a),
                key="ni_cka")

# -- parameter map ------------------------------------------------------------------------------
st.subheader("Parameter similarity (invariant to the hidden basis)")
modules = list(par["modules"])
MEAN = "mean |similarity| over modules"
which = st.selectbox("Weights", [MEAN, *modules], key="ni_module")
la = [f"L{i}" for i in par["layers_a"]]
lb = [f"L{j}" for j in par["layers_b"]]
if which == MEAN:
    z, zmin, zmid, scale = par["mean_abs"], 0, None, "Viridis"
else:
    z, zmin, zmid, scale = par["modules"][which], -1, 0, "RdBu"
kind = "task vectors" if use_deltas else "weights"
st.plotly_chart(matrix_heatmap(z, lb, la, f"Similarity of {kind}: {which}", zmin=zmin, zmax=1, zmid=zmid,
                               colorscale=scale, x_title=name_b, y_title=name_a), key="ni_params")
st.caption(f"{par.get('measure', 'debiased CKA')}, over {par.get('tokens', '?')} shared token ids: each "
           "matrix's metric on the side that runs over hidden units is read on its own model's "
           "token embeddings, so hidden units need no correspondence (a model and a copy with its "
           "hidden units permuted score 1, unrelated models about 0).")

sub = maps.get("subspace")
if sub:
    st.subheader("Principal-subspace overlap (invariant to unit order)")
    sub_which = st.selectbox("Weights", ["mean over modules", *sub["modules"]], key="ni_sub_module")
    z_sub = sub["mean"] if sub_which == "mean over modules" else sub["modules"][sub_which]
    st.plotly_chart(matrix_heatmap(z_sub, [f"L{j}" for j in sub["layers_b"]], [f"L{i}" for i in sub["layers_a"]],
                                   f"Subspace overlap of {kind}: {sub_which}", zmin=0, zmax=1,
                                   colorscale="Viridis", x_title=name_b, y_title=name_a), key="ni_subspace")
    st.caption(f"{sub['measure']}, top {sub['rank']} directions of each matrix read on its own model's "
               f"embeddings of {sub['tokens']} shared tokens: 1 for the same subspace, about "
               f"{sub['rank']}/{sub['tokens']} for unrelated ones.")

# -- where it is low ----------------------------------------------------------------------------
st.subheader("Where cross-scale similarity is low")


def _explain(summary: dict, row_labels: list[str], col_labels: list[str], what: str, low: float) -> list[str]:
    lines = []
    if summary.get("mean") is not None:
        lines.append(f"Mean {what} over all layer pairs: **{summary['mean']:.2f}**.")
    weak = [b for b in summary["best_match"] if b["value"] < low]
    if weak:
        rows = ", ".join(f"{row_labels[b['row']]} (best {col_labels[b['best_col']]}: {b['value']:.2f})"
                         for b in weak)
        lines.append(f"Layers of {name_a} with no good partner in {name_b} ({what} < {low}): {rows}.")
    else:
        lines.append(f"Every layer of {name_a} has a partner in {name_b} with {what} ≥ {low}.")
    if summary["lowest"]:
        cells = ", ".join(f"{row_labels[c['row']]}–{col_labels[c['col']]} ({c['value']:.2f})"
                          for c in summary["lowest"][:3])
        lines.append(f"Lowest cells: {cells}.")
    return lines


fig = go.Figure()
fig.add_trace(go.Scatter(x=[rows_a[b["row"]] for b in act["summary"]["best_match"]],
                         y=[b["value"] for b in act["summary"]["best_match"]], mode="lines+markers",
                         name="best CKA"))
fig.add_trace(go.Scatter(x=[la[b["row"]] for b in par["summary"]["best_match"]],
                         y=[b["value"] for b in par["summary"]["best_match"]], mode="lines+markers",
                         name="best mean |similarity| of weights"))
fig.update_layout(title=f"For each layer of {name_a}: its best match in {name_b}", yaxis_range=[0, 1],
                  xaxis_title=f"layer of {name_a}", yaxis_title="similarity", height=320)
fig.update_xaxes(type="category")
st.plotly_chart(fig, key="ni_best")
left, right = st.columns(2)
with left:
    st.markdown("**Activations (CKA)**")
    st.markdown("\n".join(f"- {line}" for line in _explain(act["summary"], rows_a, cols_b, "CKA", 0.5)))
with right:
    st.markdown(f"**Parameters ({kind})**")
    st.markdown("\n".join(f"- {line}" for line in _explain(par["summary"], la, lb, "mean |similarity|", 0.1)))
st.caption("CKA is 1 for representations equal up to rotation and scale, near 0 for unrelated ones. "
           "Low values off the diagonal are expected; low values on the best-match line mean that "
           "the layer's computation has no counterpart at the other scale, so its parameters cannot "
           "simply be transferred.")

# -- transfer -----------------------------------------------------------------------------------
from pages._transfer_section import transfer_section  # noqa: E402

transfer_section(zoo, entries)
