"""The merge lab's "Assemble an MoE" section: the selected fine-tunes as experts of a Mixtral
(mergekit-moe's config, shown and downloadable), each expert's routing prompts prefilled from
its zoo task's training prompts, run as a ``moe`` job into the export folder. Glue only."""

from __future__ import annotations

import streamlit as st

from engine.errors import DeltaWorkbenchError
from engine.jobs import JobSpec
from engine.moe.config import GATE_MODES, parse_moe_config
from engine.moe.prompts import zoo_task_prompts
from pages._shared import job_manager, new_export_folder, short_name, show_error

GATE_HELP = {
    "hidden": "the base's hidden state of each prompt's last token, per layer (mergekit's default)",
    "hidden_avg": "the base's hidden states averaged over each prompt's tokens (padding excluded: ours)",
    "hidden_last": "as hidden",
    "cheap_embed": "the prompts' summed token embeddings, the same for every layer (no forward pass)",
    "random": "standard normal rows (seeded: ours; mergekit's are unseeded)",
    "uniform_random": "nn.Linear's initialisation (seeded)",
}


@st.cache_data(show_spinner=False, max_entries=64)
def _prompts(folder: str) -> tuple[str | None, list[str]]:
    return zoo_task_prompts(folder, n=8)


def moe_section(base: str, finetunes: list[str]) -> None:
    st.subheader("Assemble an MoE")
    st.caption("Each chosen fine-tune becomes one expert of every layer's MLP (attention, "
               "embeddings and norms are the base's); a router per layer sends each token to "
               "the experts whose prompts it resembles. mergekit-moe's config format.")
    experts = st.multiselect("Experts", finetunes, default=finetunes, format_func=short_name,
                             key="moe_experts")
    if not experts:
        st.info("Choose at least one expert.")
        return
    cols = st.columns(3)
    prefilled = {folder: _prompts(folder) for folder in experts}
    # models with no zoo task come with no prompts: start them on random gates (the prompt
    # gates need a prompt per expert first), zoo models on mergekit's default, hidden
    start = 0 if all(prompts for _, prompts in prefilled.values()) else GATE_MODES.index("random")
    gate_mode = cols[0].selectbox("Gate mode", GATE_MODES, index=start, key="moe_gate_mode",
                                  help="; ".join(f"{k}: {v}" for k, v in GATE_HELP.items()))
    per_token = cols[1].number_input("Experts per token", 1, len(experts), min(2, len(experts)),
                                     key="moe_per_token")
    dtype = cols[2].selectbox("dtype", ["float32", "bfloat16", "float16"], key="moe_dtype")
    entries = []
    for folder in experts:
        task, prompts = prefilled[folder]
        label = f"Prompts for {short_name(folder)}" + (f" (task {task})" if task else "")
        text = st.text_area(label, value="\n".join(prompts), height=100, key=f"moe_prompts.{folder}",
                            help="One prompt per line; what should be routed to this expert.")
        entry = {"source_model": folder,
                 "positive_prompts": [line for line in text.splitlines() if line.strip()]}
        if not entry["positive_prompts"]:
            entry.pop("positive_prompts")
        entries.append(entry)
    data = {"base_model": base, "gate_mode": gate_mode, "dtype": dtype,
            "experts_per_token": int(per_token), "experts": entries}
    try:
        config_yaml = parse_moe_config(data).to_yaml()
    except DeltaWorkbenchError as err:
        show_error(err, "MoE config")
        return
    with st.expander("Config (mergekit-moe YAML)"):
        st.markdown(f"```yaml\n{config_yaml}```")
    st.download_button("Download the MoE config", config_yaml, file_name="moe_config.yml",
                       mime="application/x-yaml", key="moe_download")
    with st.form("moe_run_form"):
        out_name = st.text_input("MoE output folder name (under the export folder)", value="moe",
                                 key="moe_out_name")
        if st.form_submit_button("Assemble the MoE as a job"):
            try:
                out = new_export_folder(out_name)
                job_id = job_manager().submit(JobSpec(
                    kind="moe", title=f"moe of {len(experts)} experts -> {out_name}",
                    params={"config_yaml": config_yaml, "out": str(out)}))
                st.success(f"Queued job {job_id}: follow it on the Jobs page; the model appears "
                           "on the Export page when it is done.")
            except DeltaWorkbenchError as err:
                show_error(err, "Cannot assemble the MoE")
