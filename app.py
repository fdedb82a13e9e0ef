"""Delta Workbench: the Streamlit entry point.

Pages are glue: they read state, call the engine, draw. This file only sets up navigation
and the sidebar (device, zoo location).
"""

from __future__ import annotations

import streamlit as st

from engine import settings
from engine.device import describe_device
from pages._shared import human_bytes, job_manager, startup_sweep

st.set_page_config(page_title="Delta Workbench", layout="wide")

pages = [
    st.Page("pages/models.py", title="Models", icon=":material/folder_open:", default=True),
    st.Page("pages/merge_lab.py", title="Merge lab", icon=":material/merge:"),
    st.Page("pages/jobs.py", title="Jobs", icon=":material/work_history:"),
    st.Page("pages/export.py", title="Export", icon=":material/download:"),
]
navigation = st.navigation(pages)

startup_sweep()

with st.sidebar:
    st.caption(f"Device: {describe_device()}")
    cache = settings.cache_path()
    size = cache.stat().st_size if cache.is_file() else 0
    st.caption(f"Metric cache: {human_bytes(size)}")
    running = job_manager().running()
    st.caption(f"Running jobs: {len(running)}" + "".join(
        f"  \n· {j.spec.title}: {j.status.progress:.0%}" for j in running))

navigation.run()
