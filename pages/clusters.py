"""Channel clusters: per layer, how the experts' channels (output rows of each task vector)
group by cosine similarity, the clustering Channel Merging uses, and what it would store."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from engine.analysis import ClusterParams, analyze_clusters
from pages._analysis import guarded, matrix_heatmap, metrics_of, split_name, tensor_label, tensor_order
from pages._shared import require_app, human_bytes, require_selection, short_name

require_app("pages/clusters.py")
st.title("Channel clusters")
st.caption("For every channel (output row) of a layer, the experts' rows are clustered by cosine "
           "into at most G groups. Channel Merging stores one merged row per group and a small "
           "index per expert channel, and rebuilds each expert from them.")

chosen = require_selection(2)
base, finetunes = chosen["base"], list(chosen["finetunes"])
labels = [short_name(p) for p in finetunes]
n = len(finetunes)

cols = st.columns(2)
groups = cols[0].number_input("Groups per channel (G)", 1, max(1, n), min(2, n), key="cl_groups",
                              help="Channel Merging's num_groups; storage is about G/N of the N experts.")
clustering = cols[1].selectbox("Clustering", ["agglomerative", "kmeans"], key="cl_method")
params = ClusterParams(num_groups=int(groups), clustering=clustering)

result = metrics_of([base, *finetunes], lambda cache: analyze_clusters(base, finetunes, params, cache=cache),
                    job_params={"base": base, "finetuned": finetunes,
                                "clusters": params.model_dump(mode="json")},
                    title=f"Channel clusters of {short_name(base)} + {n} fine-tunes", key="cl",
                    spinner="Clustering channels...", failed="The channel clustering failed")
order = tensor_order(layer["name"] for layer in result["layers"])
layers = sorted(result["layers"], key=lambda layer: order.index(layer["name"]))
if not layers:
    st.info("These models have no matrix to cluster.")
    st.stop()


@st.cache_data(show_spinner=False, max_entries=32)
def _shapes(folder: str, stamp: float) -> dict:  # noqa: ARG001 - stamp keys the cache
    """Per tensor: (shape, bytes per element) from the header."""
    from engine.io import ModelFolder

    with ModelFolder(folder) as f:
        return {name: (list(f.info(name).shape), f.info(name).nbytes // max(1, f.info(name).numel))
                for name in f.tensor_names}


def _stamp(folder: str) -> float:
    from pathlib import Path

    return max((p.stat().st_mtime for p in Path(folder).glob("*.safetensors*")), default=0.0)


# the layout is the base's (a LoRA adapter among the fine-tunes has no layout of its own)
shapes = guarded("The base cannot be read", lambda: _shapes(base, _stamp(base)))
if shapes is None:
    st.stop()


def storage(layer: dict) -> tuple[int, int]:
    """(bytes of N separate experts, bytes Channel Merging keeps: merged rows + index)."""
    shape, elem = shapes.get(layer["name"], ([layer["num_channels"], 1], 2))
    row = 1
    for s in shape[1:]:
        row *= s
    separate = layer["num_experts"] * layer["num_channels"] * row * elem
    index_bytes = 1 if layer["num_groups"] <= 256 else 2
    grouped = layer["stored_rows"] * row * elem + layer["num_experts"] * layer["num_channels"] * index_bytes
    return separate, grouped


# -- all layers --------------------------------------------------------------------------------
overview = []
for layer in layers:
    separate, grouped = storage(layer)
    idx, module = split_name(layer["name"])
    overview.append({"tensor": tensor_label(layer["name"]), "layer": idx, "module": module,
                     "channels": layer["num_channels"], "within-group cosine": layer["within_group_cosine"],
                     "between-group cosine": layer["between_group_cosine"],
                     "stored fraction": layer["storage_fraction"], "separate bytes": separate,
                     "grouped bytes": grouped})
table = pd.DataFrame(overview)
total_sep, total_grp = int(table["separate bytes"].sum()), int(table["grouped bytes"].sum())
m = st.columns(4)
m[0].metric("N experts separately", human_bytes(total_sep))
m[1].metric("Channel Merging stores", human_bytes(total_grp))
m[2].metric("Stored / separate", f"{total_grp / total_sep:.0%}" if total_sep else "n/a")
m[3].metric("Mean within-group cosine", f"{table['within-group cosine'].mean():.3f}"
            if table["within-group cosine"].notna().any() else "n/a")
st.caption("Bytes of the clustered matrices' deltas in the fine-tunes' dtype; grouped = one row per "
           "non-empty group and channel plus one index entry per expert channel.")

fig = go.Figure()
fig.add_trace(go.Bar(x=table["tensor"].tolist(), y=table["within-group cosine"].tolist(), name="within groups"))
fig.add_trace(go.Bar(x=table["tensor"].tolist(), y=table["between-group cosine"].tolist(), name="between groups"))
fig.update_layout(title="Row cosine inside and across groups, per tensor", barmode="group",
                  yaxis_title="mean cosine", height=360, xaxis_tickangle=-45)
st.plotly_chart(fig, key="cl_cosines")
fig = go.Figure(go.Bar(x=table["tensor"].tolist(), y=table["stored fraction"].tolist()))
fig.update_layout(title="Stored rows as a fraction of N separate experts", yaxis_title="fraction",
                  yaxis_range=[0, 1], height=320, xaxis_tickangle=-45)
st.plotly_chart(fig, key="cl_storage")

# -- one tensor ---------------------------------------------------------------------------------
st.subheader("One tensor")
names = [layer["name"] for layer in layers]
name = st.selectbox("Tensor", names, key="cl_tensor", format_func=tensor_label)
layer = layers[names.index(name)]
separate, grouped = storage(layer)
m = st.columns(4)
m[0].metric("channels", layer["num_channels"])
m[1].metric("within-group cosine", "n/a" if layer["within_group_cosine"] is None
            else f"{layer['within_group_cosine']:.3f}")
m[2].metric("separate", human_bytes(separate))
m[3].metric("grouped", human_bytes(grouped) + (f" ({grouped / separate:.0%})" if separate else ""))

left, right = st.columns(2)
counts = layer["expert_group_counts"]  # [expert][group]
fig = go.Figure([go.Bar(x=labels, y=[counts[i][g] for i in range(n)], name=f"group {g}")
                 for g in range(layer["num_groups"])])
fig.update_layout(title="Where each expert's channels land", barmode="stack", yaxis_title="channels",
                  height=340)
left.plotly_chart(fig, key="cl_expert_groups")
patterns = layer["size_patterns"]
fig = go.Figure(go.Bar(x=list(patterns), y=list(patterns.values())))
fig.update_layout(title="How the experts split, per channel (group sizes)", xaxis_title="split",
                  yaxis_title="channels", height=340)
fig.update_xaxes(type="category")
right.plotly_chart(fig, key="cl_patterns")

left, right = st.columns(2)
left.plotly_chart(matrix_heatmap(layer["co_assignment"], labels, labels,
                                 "Share of channels where two experts share a group", zmin=0, zmax=1,
                                 colorscale="Blues"), key="cl_coassign")
right.plotly_chart(matrix_heatmap(layer["mean_cosine"], labels, labels, "Mean row cosine", zmin=-1, zmax=1,
                                  zmid=0), key="cl_mean_cosine")
st.caption(f"Group sizes over all channels: {layer['group_sizes']} (expert-channels per group; group 0 "
           "always holds the first expert).")
