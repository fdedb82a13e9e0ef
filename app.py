"""Delta Workbench: the Streamlit entry point.

Pages are glue: they read state, call the engine, draw. This file only sets up navigation
and the sidebar (device, zoo location).
"""

from __future__ import annotations

import streamlit as st

from engine.device import describe_device

st.set_page_config(page_title="Delta Workbench", layout="wide")

pages = [
    st.Page("pages/models.py", title="Models", icon=":material/folder_open:", default=True),
]
navigation = st.navigation(pages)

with st.sidebar:
    st.caption(f"Device: {describe_device()}")

navigation.run()
