"""Delta Workbench: the Streamlit entry point.

Pages are glue: they read state, call the engine, draw. This file only sets up navigation
and the sidebar (device, zoo location).
"""

from __future__ import annotations

import os

# Streamlit runs each script run on its own thread, and the engine reads ahead on another:
# OpenMP's default spin-waiting then makes small torch/LAPACK calls up to 100x slower on a
# busy CPU. Passive waiting must be chosen before torch loads (workers inherit it).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import streamlit as st  # noqa: E402
from streamlit import config as st_config  # noqa: E402

from engine import settings  # noqa: E402
from engine.settings import ALLOW_REMOTE_ENV, is_loopback  # noqa: E402
from engine.device import describe_device  # noqa: E402
from pages._shared import APP_RAN_KEY, DEEP_LINK_KEY, human_bytes, job_manager, startup_sweep  # noqa: E402

st.set_page_config(page_title="Delta Workbench", layout="wide")

# .streamlit/config.toml pins the address only when streamlit starts in the project folder;
# from anywhere else (or with --server.address) it may listen on every interface, and this app
# reads and writes local files for whoever connects. So it serves only on loopback unless told.
_address = st_config.get_option("server.address")
if not is_loopback(_address) and os.environ.get(ALLOW_REMOTE_ENV) != "1":
    st.error(f"Delta Workbench serves on the loopback interface only, and this server listens on "
             f"{_address or 'every interface'}. Start it with `python run_app.py` (or "
             f"`python -m engine app`), which binds 127.0.0.1 from any folder; to serve beyond "
             f"this machine anyway, set {ALLOW_REMOTE_ENV}=1.")
    st.stop()

pages = [
    st.Page("pages/models.py", title="Models", icon=":material/folder_open:", default=True),
    st.Page("pages/spectra.py", title="Delta spectra", icon=":material/bar_chart:"),
    st.Page("pages/similarity.py", title="Similarity and conflicts", icon=":material/compare_arrows:"),
    st.Page("pages/clusters.py", title="Channel clusters", icon=":material/hub:"),
    st.Page("pages/incompatibility.py", title="Neural incompatibility", icon=":material/grid_on:"),
    st.Page("pages/merge_lab.py", title="Merge lab", icon=":material/merge:"),
    st.Page("pages/compression_lab.py", title="Compression lab", icon=":material/compress:"),
    st.Page("pages/safety_repair.py", title="Safety repair", icon=":material/health_and_safety:"),
    st.Page("pages/vision_fusion.py", title="Vision fusion", icon=":material/visibility:"),
    st.Page("pages/jobs.py", title="Jobs", icon=":material/work_history:"),
    st.Page("pages/export.py", title="Export", icon=":material/download:"),
]
navigation = st.navigation(pages)
st.session_state[APP_RAN_KEY] = True
if DEEP_LINK_KEY in st.session_state:  # see pages._shared.require_app
    st.switch_page(st.session_state.pop(DEEP_LINK_KEY))

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
