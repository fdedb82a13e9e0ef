"""The Neural incompatibility page's "Transfer" section: move a large zoo fine-tune's task into
the small base by PostPKT, LaTen or a control, as a ``transfer`` job into the export folder;
the finished outputs' accuracies (target base, transferred, control, a plain fine-tune of the
same step budget) and PostPKT's learning curves (extracted vs random LoRA init). Glue only."""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from engine import settings
from engine.errors import DeltaWorkbenchError
from engine.jobs import JobSpec
from engine.transfer import METHODS
from engine.transfer.results import transfer_outputs
from pages._shared import job_manager, new_export_folder, short_name, show_error

METHOD_HELP = {
    "postpkt": "PostPKT (Seeking Neural Nuggets): LoRA initialised from the teacher's most sensitive "
               "submatrices, then fine-tuned",
    "postpkt_control": "the same fine-tune from a random LoRA initialisation",
    "laten": "LaTen: located neurons mapped by small translators trained a few steps; no fine-tune",
    "laten_control": "the same pipeline fed random vectors of the teacher vectors' norms",
}
LABELS = {"target_base": "target base", "transferred": "transferred", "control": "control",
          "plain_finetune": "plain fine-tune (same steps)"}


def transfer_section(zoo, entries: dict[str, dict]) -> None:
    st.subheader("Transfer")
    st.caption("Cross-scale parametric knowledge transfer (Tan et al., ACL 2025): the large "
               "fine-tune's task into the small base. The paper finds neither paradigm transfers "
               "reliably; each method runs beside its control and a plain fine-tune.")
    sources = [p for p, m in entries.items() if m.get("family") == "large" and m.get("role") == "finetune"]
    targets = [p for p, m in entries.items() if m.get("family") == "small" and m.get("role") == "base"]
    if not sources or not targets:
        st.info("The zoo needs a large fine-tune and the small base for a transfer.")
        return
    cols = st.columns(3)
    method = cols[0].selectbox("Method", METHODS, key="tr_method", help="; ".join(
        f"{k}: {v}" for k, v in METHOD_HELP.items()))
    source = cols[1].selectbox("Source (large fine-tune)", sources, format_func=short_name, key="tr_source")
    target = cols[2].selectbox("Target (small base)", targets, format_func=short_name, key="tr_target")
    task = entries[source].get("task") or "reverse"
    st.caption(f"Task: **{task}** (the source's); scored on its held-out examples.")
    with st.form("tr_form"):
        out_name = st.text_input("Output folder name (under the export folder)",
                                 value=f"transfer-{method}-{task}", key="tr_out_name")
        if st.form_submit_button("Run the transfer as a job"):
            try:
                out = new_export_folder(out_name)
                job_id = job_manager().submit(JobSpec(
                    kind="transfer", title=f"transfer {method} {short_name(source)} -> {short_name(target)}",
                    params={"method": method, "source": source,
                            "source_base": str(zoo / entries[source]["parent"]),
                            "target": target, "task": task, "out": str(out), "baselines": True}))
                st.success(f"Queued job {job_id}: follow it on the Jobs page; its results appear "
                           "below when it is done.")
            except DeltaWorkbenchError as err:
                show_error(err, "Cannot run the transfer")
    done = transfer_outputs(settings.export_dir())
    if not done:
        st.info("No finished transfer in the export folder yet.")
        return
    pick = st.selectbox("Finished transfer", [d["path"] for d in done], format_func=short_name, key="tr_done")
    row = next(d for d in done if d["path"] == pick)
    acc = row["accuracy"]
    bars = go.Figure(go.Bar(x=[LABELS.get(k, k) for k in acc], y=list(acc.values())))
    bars.update_layout(title=f"{row['method']} on {row['task']}: accuracy", yaxis_range=[0, 1],
                       yaxis_title="exact match", height=320)
    st.plotly_chart(bars, key="tr_acc")
    curves = [d for d in done if d["curve"] and d["task"] == row["task"] and d["source"] == row["source"]]
    if curves:
        fig = go.Figure()
        for d in curves:
            init = "random init" if d["method"].endswith("_control") else "extracted init"
            fig.add_trace(go.Scatter(x=[c["step"] for c in d["curve"]], y=[c["accuracy"] for c in d["curve"]],
                                     mode="lines+markers", name=f"{init} ({short_name(d['path'])})"))
        fig.update_layout(title="PostPKT: accuracy vs fine-tune steps", xaxis_title="step",
                          yaxis_title="exact match", yaxis_range=[0, 1], height=320)
        st.plotly_chart(fig, key="tr_curve")
