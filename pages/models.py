"""Models: the demo zoo (built here if missing) and any local model folder's inventory."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from engine import settings
from engine.errors import DeltaWorkbenchError
from engine.io import ModelFolder
from engine.paths import resolve_user_path
from engine.zoo import build_zoo, load_manifest

st.title("Models")

zoo = settings.zoo_dir()
manifest = None
if (zoo / "zoo.json").is_file():
    try:
        manifest = load_manifest(zoo)
    except DeltaWorkbenchError as err:
        st.error(f"The demo zoo cannot be read: {err}")

if manifest is None:
    st.info(f"No demo zoo yet in `{zoo}`. Build it here: it trains a small model family on CPU.")
    quick = st.checkbox("Quick build (smaller models, about a minute)", value=False)
    if st.button("Build the demo zoo", type="primary"):
        bar = st.progress(0.0, text="starting")
        try:
            build_zoo(zoo, quick=quick, progress=lambda f, msg: bar.progress(min(max(f, 0.0), 1.0), text=msg))
        except DeltaWorkbenchError as err:
            st.error(f"Zoo build failed: {err}")
        else:
            st.success("Demo zoo built.")
            st.rerun()
else:
    st.subheader("Demo zoo")
    rows = [
        {"path": m["path"], "family": m.get("family"), "role": m.get("role"), "task": m.get("task")}
        for m in manifest["models"]
    ]
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")

st.subheader("Open a local model folder")
roots = ", ".join(f"`{r}`" for r in settings.allowed_roots())
st.caption(f"Folders are accepted under the allowed roots: {roots}.")
typed = st.text_input("Model folder", key="inspect_path")
if typed:
    try:
        folder = resolve_user_path(typed, settings.allowed_roots())
        with ModelFolder(folder) as model:
            st.write(
                f"**{model.config.get('model_type', '?')}** · {len(model.tensor_names)} tensors · "
                f"{model.num_parameters:,} parameters · {len(model.shard_files)} shard(s)"
            )
            table = [
                {"tensor": n, "shape": str(tuple(model.info(n).shape)), "dtype": str(model.info(n).dtype)}
                for n in model.tensor_names
            ]
        st.dataframe(pd.DataFrame(table), hide_index=True, width="stretch")
    except DeltaWorkbenchError as err:
        st.error(str(err))
