"""Export: write merged (or decompressed) checkpoints to folders through the atomic writer, see
what is there, and download small ones as a zip."""

from __future__ import annotations

import io
import os
import shutil
import stat
import zipfile
from pathlib import Path

import streamlit as st

from engine import settings
from engine.errors import ConfigError, DeltaWorkbenchError
from engine.jobs import JobSpec
from engine.compress import folder_bytes
from engine.recipe import check_recipe_paths, parse_recipe_text
from engine.textparse import parse_json
from pages._shared import require_app, human_bytes, job_manager, new_export_folder, show_error

DOWNLOAD_LIMIT = 64 * 2**20  # folders up to this size are offered as a zip download
MANIFEST = "delta_workbench_manifest.json"
MANIFEST_LIMIT = 16 * 2**20

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
    """The folder's regular files as a zip. Symlinks (to files or folders) are never followed:
    the walk does not descend into them and each file is opened with O_NOFOLLOW relative to its
    folder's descriptor, so a link swapped in after the listing is not read either."""
    buffer = io.BytesIO()
    top = Path(folder).name
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for dirpath, dirnames, filenames, dirfd in os.fwalk(folder, follow_symlinks=False):
            dirnames.sort()
            relative = Path(dirpath).relative_to(folder)
            for name in sorted(filenames):
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dirfd)
                except OSError:
                    continue  # a symlink (ELOOP), or gone since the listing
                with os.fdopen(fd, "rb") as handle:
                    if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                        continue  # FIFOs, sockets, devices
                    with archive.open(f"{top}/{(relative / name).as_posix()}", "w") as entry:
                        shutil.copyfileobj(handle, entry)
    return buffer.getvalue()


def _manifest(folder: Path):
    """The folder's manifest, or None when it has none: read like any file of a folder, never
    through a symlink, bounded in size and depth."""
    try:
        fd = os.open(folder / MANIFEST, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as err:  # ELOOP: a symlink
        raise ConfigError(f"not a regular file ({err.strerror})", path=folder / MANIFEST) from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > MANIFEST_LIMIT:
            raise ConfigError("not a regular file of at most "
                              f"{human_bytes(MANIFEST_LIMIT)}", path=folder / MANIFEST)
        raw = handle.read(MANIFEST_LIMIT + 1)
    return parse_json(raw, source=str(folder / MANIFEST), max_bytes=MANIFEST_LIMIT)


st.subheader("Exported folders")
# Only real folders: an entry that is a symlink is not listed (nor zipped) whatever it points to.
folders = sorted((p for p in exports.iterdir()
                  if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")),
                 key=lambda p: p.stat().st_mtime, reverse=True) if exports.is_dir() else []
if not folders:
    st.info("Nothing exported yet.")
for folder in folders:
    size = folder_bytes(folder)
    with st.container(border=True):
        st.markdown(f"**{folder.name}** · {human_bytes(size)}")
        try:
            manifest = _manifest(folder)
        except DeltaWorkbenchError as err:
            st.warning(f"its manifest cannot be read: {err.reason}")
            manifest = None
        if isinstance(manifest, dict):
            kind = manifest.get("kind") or (manifest.get("extra") or {}).get("kind")
            st.caption(f"kind: {kind or 'model'} · shards: "
                       f"{len(manifest.get('shards', manifest.get('files', [])))}")
        if size <= DOWNLOAD_LIMIT:
            st.download_button("Download as zip", _zip(str(folder), size,
                                                        folder.stat().st_mtime),
                               file_name=f"{folder.name}.zip", mime="application/zip",
                               key=f"dl-{folder.name}")
        else:
            st.caption(f"Too large to download here (over {human_bytes(DOWNLOAD_LIMIT)}); "
                       "copy the folder instead.")
