"""Export: write merged (or decompressed) checkpoints to folders through the atomic writer, see
what is there, and download small ones as a zip."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import streamlit as st

from engine import settings
from engine.errors import DeltaWorkbenchError
from engine.jobs import JobSpec
from engine.compress import folder_bytes
from engine.recipe import check_recipe_paths, parse_recipe_text
from pages._shared import require_app, human_bytes, job_manager, new_export_folder, show_error

DOWNLOAD_LIMIT = 64 * 2**20  # folders up to this size are offered as a zip download
MANIFEST = "delta_workbench_manifest.json"

require_app("pages/export.py")
st.title("Export")
exports = settings.export_dir()
st.caption(f"Exports are written to `{exports}` (staged beside it, verified, then renamed: a "
           "failed or cancelled export leaves nothing behind).")


st.subheader("Merge from a recipe")
with st.form("export_merge_form"):
    recipe_text = st.text_area("Recipe (mergekit YAML; model paths absolute, under the allowed "
                               "roots)", height=220, key="export_recipe",
                               value=st.session_state.get("export_recipe_default", ""))
    out_name = st.text_input("Output folder name", key="export_out_name")
    submitted = st.form_submit_button("Export")
if submitted:
    try:
        out = new_export_folder(out_name)
        # refused here, not in the worker: a bad recipe, or a model folder outside the allowed
        # roots (the job checks again)
        check_recipe_paths(parse_recipe_text(recipe_text), settings.allowed_roots())
        job_id = job_manager().submit(JobSpec(kind="merge", title=f"export {out_name}", params={
            "recipe_yaml": recipe_text, "out": str(out)}))
        st.success(f"Queued job {job_id}: follow it on the Jobs page.")
    except DeltaWorkbenchError as err:
        show_error(err, "Cannot export")


st.subheader("Rebuild a fine-tune from a compressed artifact")
with st.form("export_decompress_form"):
    artifact_text = st.text_input("Artifact folder (under the allowed roots or the workbench's "
                                  "artifacts folder)", key="export_artifact")
    base_text = st.text_input("Its base model folder", key="export_base")
    rebuilt_name = st.text_input("Output folder name", key="export_rebuilt_name")
    rebuild = st.form_submit_button("Rebuild and export")
if rebuild:
    from engine.paths import resolve_user_path

    roots = [*settings.allowed_roots(), settings.workbench_home() / "artifacts"]
    try:
        out = new_export_folder(rebuilt_name)
        artifact_dir = resolve_user_path(artifact_text, roots, kind="dir")
        base_dir = resolve_user_path(base_text, settings.allowed_roots(), kind="dir")
        job_id = job_manager().submit(JobSpec(kind="decompress", title=f"rebuild {rebuilt_name}",
                                              params={"artifact": str(artifact_dir),
                                                      "base": str(base_dir),
                                                      "out": str(out)}))
        st.success(f"Queued job {job_id}: follow it on the Jobs page.")
    except DeltaWorkbenchError as err:
        show_error(err, "Cannot rebuild")


@st.cache_data(show_spinner=False, max_entries=8)
def _zip(folder: str, size: int, mtime: float) -> bytes:  # noqa: ARG001 - cache keys
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file() and not path.is_symlink():
                archive.write(path, Path(folder).name + "/" + str(path.relative_to(folder)))
    return buffer.getvalue()


st.subheader("Exported folders")
folders = sorted((p for p in exports.iterdir() if p.is_dir() and not p.name.startswith(".")),
                 key=lambda p: p.stat().st_mtime, reverse=True) if exports.is_dir() else []
if not folders:
    st.info("Nothing exported yet.")
for folder in folders:
    size = folder_bytes(folder)
    with st.container(border=True):
        st.markdown(f"**{folder.name}** · {human_bytes(size)}")
        manifest_path = folder / MANIFEST
        if manifest_path.is_file():
            try:
                manifest = json.loads(manifest_path.read_text())
                kind = manifest.get("kind") or manifest.get("extra", {}).get("kind")
                st.caption(f"kind: {kind or 'model'} · shards: "
                           f"{len(manifest.get('shards', manifest.get('files', [])))}")
            except ValueError:
                st.warning("its manifest is not valid JSON")
        if size <= DOWNLOAD_LIMIT:
            st.download_button("Download as zip", _zip(str(folder), size,
                                                        folder.stat().st_mtime),
                               file_name=f"{folder.name}.zip", mime="application/zip",
                               key=f"dl-{folder.name}")
        else:
            st.caption(f"Too large to download here (over {human_bytes(DOWNLOAD_LIMIT)}); "
                       "copy the folder instead.")
