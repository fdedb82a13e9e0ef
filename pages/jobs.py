"""Jobs: heavy work running in worker processes: progress, logs, results, cancel."""

from __future__ import annotations

import json
import time

import streamlit as st

from pages._shared import require_app, job_manager

require_app("pages/jobs.py")
st.title("Jobs")
st.caption("Full analyses, merges, compressions and exports run in their own worker processes "
           "(on the GPU when there is one). They keep running when you leave or reload the page.")

manager = job_manager()


@st.fragment(run_every=1.0)
def job_list() -> None:
    manager.poll()
    jobs = manager.jobs()
    if not jobs:
        st.info("No jobs yet. Pages that start heavy work (merge, compress, export) queue them here.")
        return
    for job in jobs:
        status = job.status
        with st.container(border=True):
            left, right = st.columns([4, 1])
            started = time.strftime("%H:%M:%S", time.localtime(status.submitted))
            left.markdown(f"**{job.spec.title}** · `{job.id}` · {job.spec.kind} · "
                          f"submitted {started} · **{status.state}**")
            if status.state in ("queued", "running"):
                left.progress(status.progress, text=status.message or status.state)
                if right.button("Cancel", key=f"cancel-{job.id}"):
                    manager.cancel(job.id)
                    st.rerun(scope="fragment")
            elif status.state == "failed":
                left.error(status.error or "failed")
            elif status.state == "done":
                took = (status.finished or 0) - (status.started or 0)
                left.success(f"done in {took:.1f} s")
                result = job.result()
                if result is not None:
                    with left.expander("Result"):
                        st.code(json.dumps(result, indent=1)[:20000], language="json")
            with left.expander("Log"):
                st.code(job.log_tail() or "(empty)")


job_list()
