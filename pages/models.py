"""Models: the demo zoo (built here as a job if missing; while it builds, the families finished
so far and the job's progress), the base + fine-tunes selection with its compatibility report,
any local model folder's or LoRA adapter's inventory, and the eval sets (the user's
JSONL/text files) the labs score on."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from engine import settings
from engine.compat import compatibility_report
from engine.errors import DeltaWorkbenchError
from engine.io import ModelFolder
from engine.evaluate.own_data import read_eval_file
from engine.jobs import JobSpec
from engine.lora import LoraAdapter, is_adapter_folder
from engine.lora.finetune import open_finetune
from engine.paths import resolve_user_path
from engine.text import printable
from engine.zoo import zoo_complete
from pages._shared import (EVAL_SETS_KEY, SELECTION_KEY, job_manager, require_app, selection, short_name,
                           zoo_manifest)

require_app("pages/models.py")
st.title("Models")

zoo = settings.zoo_dir()
manifest = zoo_manifest()
manager = job_manager()


def _zoo_build_job():
    builds = [j for j in manager.jobs() if j.spec.kind == "zoo_build"]
    return builds[0] if builds else None


def _shown(m: dict | None) -> tuple:
    return (len(m["models"]), zoo_complete(m)) if m else (0, False)


@st.fragment(run_every=1.0)
def zoo_build_progress() -> None:
    manager.poll()
    if _shown(zoo_manifest()) != _shown(manifest):
        st.rerun()  # a family was published: the whole page, with its models
    job = _zoo_build_job()
    if job is None:
        return
    if job.status.state in ("queued", "running"):
        st.progress(job.status.progress, text=job.status.message or job.status.state)
    elif job.status.state == "done":
        st.success("Demo zoo built.")
    elif job.status.state == "failed":
        st.error(f"Zoo build failed: {job.status.error}")


def _build_busy() -> bool:
    job = _zoo_build_job()
    return job is not None and job.status.state in ("queued", "running")


if manifest is None:
    st.info(f"No demo zoo yet in `{zoo}`. Build it here: it trains a small Llama model family "
            "on CPU (about 10 minutes; the quick build takes about 2 and learns little). Each "
            "family appears here as soon as it is trained, the small one first (about 4 "
            "minutes in).")
    quick = st.checkbox("Quick build (structural zoo for a first look)", value=False)
    if st.button("Build the demo zoo", type="primary", disabled=_build_busy()):
        manager.submit(JobSpec(kind="zoo_build", title="Build the demo zoo",
                               params={"out": str(zoo), "quick": quick}))
        st.rerun()
    zoo_build_progress()
else:
    st.subheader("Demo zoo")
    rows = [{"path": m["path"], "family": m.get("family"), "role": m.get("role"),
             "task": m.get("task"),
             "own-task accuracy": (m.get("accuracy") or {}).get(m.get("task") or "", None),
             "parameters": m.get("num_parameters")} for m in manifest["models"]]
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    if not zoo_complete(manifest):
        pending = [printable(p) for p in manifest.get("pending", [])]
        st.info(f"Still training: {len(pending)} model(s) ({', '.join(pending)}). The models "
                "above can be used now; the rest appear as their family is finished.")
        busy = _build_busy()
        if not busy and st.button("Continue the zoo build", type="primary"):
            # the build itself checks that quick and seed are those the zoo was started with
            seed = manifest.get("seed")
            try:
                manager.submit(JobSpec(kind="zoo_build", title="Continue the demo zoo build",
                                       params={"out": str(zoo), "resume": True,
                                               "quick": manifest.get("quick") is True,
                                               "seed": seed if isinstance(seed, int) else 0}))
                st.rerun()
            except DeltaWorkbenchError as err:
                st.error(str(err))
        zoo_build_progress()

# -- selection ---------------------------------------------------------------------------------
st.subheader("Base and fine-tunes")
chosen = selection()
zoo_paths = [str(zoo / m["path"]) for m in manifest["models"]] if manifest else []
extra = st.session_state.setdefault("extra_folders", [])
options = list(dict.fromkeys(zoo_paths + extra + [p for p in [chosen.get("base")] if p]
                             + list(chosen.get("finetunes", []))))
with st.form("selection_form"):
    base = st.selectbox("Base model", options, format_func=short_name,
                        index=options.index(chosen["base"]) if chosen.get("base") in options
                        else None, key="select_base")
    finetunes = st.multiselect("Fine-tunes", options, format_func=short_name,
                               default=[p for p in chosen.get("finetunes", []) if p in options],
                               key="select_finetunes")
    if st.form_submit_button("Use this selection"):
        st.session_state[SELECTION_KEY] = {"base": base, "finetunes":
                                           [f for f in finetunes if f != base]}
        chosen = st.session_state[SELECTION_KEY]

if chosen.get("base") and chosen.get("finetunes"):
    try:
        with ModelFolder(chosen["base"]) as base_folder:
            folders = []
            try:
                folders.extend(open_finetune(p, base_folder) for p in chosen["finetunes"])
                report = compatibility_report(base_folder, folders)
            finally:
                for f in folders:
                    f.close()
        if report.ok:
            st.success(f"Compatible: {short_name(chosen['base'])} + "
                       f"{len(chosen['finetunes'])} fine-tune(s) can be merged and compared.")
        else:
            st.error("Not compatible:\n\n" + "\n".join(f"- {e}" for e in report.errors))
        for warning in report.warnings:
            st.warning(warning)
    except DeltaWorkbenchError as err:
        st.error(str(err))

# -- local folders -----------------------------------------------------------------------------
def _inventory(folder) -> tuple[str, list[dict]]:
    """A one-line summary and a per-tensor table of a model folder or a LoRA adapter (headers
    only)."""
    if is_adapter_folder(folder):
        with LoraAdapter(folder) as adapter:
            ranks = sorted({m.rank for m in adapter.modules.values()})
            summary = (f"**PEFT LoRA adapter** · {len(adapter.modules)} modules · rank "
                       f"{', '.join(map(str, ranks)) or '-'} · {len(adapter.whole)} tensor(s) saved "
                       "whole. Pick it as a fine-tune of its base: its task vector is read module "
                       "by module, never merged into a copy.")
            return summary, [{"tensor": n, "delta shape": str(adapter.delta_shape(n))}
                             for n in adapter.targets]
    with ModelFolder(folder) as model:
        summary = (f"**{model.config.get('model_type', '?')}** · {len(model.tensor_names)} tensors · "
                   f"{model.num_parameters:,} parameters · {len(model.shard_files)} shard(s)")
        return summary, [{"tensor": n, "shape": str(tuple(model.info(n).shape)),
                          "dtype": str(model.info(n).dtype)} for n in model.tensor_names]


st.subheader("Open a local model folder")
roots = ", ".join(f"`{r}`" for r in settings.allowed_roots())
st.caption(f"Folders are accepted under the allowed roots: {roots}. A PEFT LoRA adapter folder "
           "(adapter_config.json + adapter_model.safetensors) is a fine-tune of its base.")
typed = st.text_input("Model folder or LoRA adapter folder", key="inspect_path")
if typed:
    try:
        folder = resolve_user_path(typed, settings.allowed_roots())
        summary, table = _inventory(folder)
        st.write(summary)
        st.dataframe(pd.DataFrame(table), hide_index=True, width="stretch")
        if str(folder) not in options and st.button("Add to the choices above", key="add_folder"):
            extra.append(str(folder))
            st.rerun()
    except DeltaWorkbenchError as err:
        st.error(str(err))

# -- eval sets ---------------------------------------------------------------------------------
st.subheader("Eval sets")
st.caption("Your own data for the labs: a JSONL file of `{\"prompt\": ..., \"answer\": ...}` "
           "lines (exact match of the greedy answer) or a .txt file of documents (perplexity). "
           "Each line falls in a dev or a held-out half by a stable hash: merges and rebuilds are "
           "scored on the held-out half, calibration uses the dev half.")
registered = st.session_state.setdefault(EVAL_SETS_KEY, [])
typed_set = st.text_input("Eval file (.jsonl or .txt)", key="eval_set_path")
if typed_set:
    try:
        path = resolve_user_path(typed_set, settings.allowed_roots(), kind="file")
        evalset = read_eval_file(path)
        dev, held = len(evalset.split("dev")), len(evalset.split("heldout"))
        st.write(f"**{evalset.name}** · {'prompt/answer' if evalset.kind == 'qa' else 'text'} · "
                 f"{len(evalset)} lines ({dev} dev, {held} held-out)")
        if str(path) not in registered and st.button("Register this eval set", key="add_eval_set"):
            registered.append(str(path))
            st.rerun()
    except DeltaWorkbenchError as err:
        st.error(str(err))
for i, path in enumerate(list(registered)):
    cols = st.columns([5, 1])
    cols[0].write(f"`{printable(path)}`")
    if cols[1].button("Remove", key=f"remove_eval_set_{i}"):
        registered.remove(path)
        st.rerun()
