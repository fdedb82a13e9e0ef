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
from engine.text import printable
from engine.textparse import parse_json
from pages._shared import (human_bytes, job_manager, new_export_folder, require_app, selection,
                           show_error)

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
    merge_eval = st.checkbox("Score the merged model on the zoo tasks (the table goes into its "
                             "model card)", key="export_merge_eval")
    submitted = st.form_submit_button("Export")
if submitted:
    try:
        out = new_export_folder(out_name)
        # refused here, not in the worker: a bad recipe, or a model folder outside the allowed
        # roots (the job checks again)
        check_recipe_paths(parse_recipe_text(recipe_text), settings.allowed_roots())
        job_id = job_manager().submit(JobSpec(kind="merge", title=f"export {out_name}", params={
            "recipe_yaml": recipe_text, "out": str(out), "evaluate": bool(merge_eval)}))
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


st.subheader("A fine-tune as a LoRA adapter")
st.caption("Each linear layer's task vector truncated to its best rank-r approximation (SVD), "
           "written as a PEFT adapter that `PeftModel.from_pretrained` loads, with its model card.")
chosen = selection()
with st.form("export_lora_form"):
    paths = st.columns(2)
    lora_base = paths[0].text_input("Base model folder (under the allowed roots)",
                                    value=chosen.get("base") or "", key="export_lora_base")
    lora_ft = paths[1].text_input("Fine-tune folder (under the allowed roots)",
                                  value=next(iter(chosen.get("finetunes") or []), ""),
                                  key="export_lora_finetuned")
    knobs = st.columns(4)
    lora_rank = knobs[0].number_input("Rank", min_value=1, max_value=65536, value=32, step=1,
                                      key="export_lora_rank",
                                      help="the most singular triplets kept per module")
    lora_cutoff = knobs[1].number_input("Singular-value cut-off", min_value=0.0, max_value=0.99,
                                        value=0.0, step=0.01, key="export_lora_cutoff",
                                        help="also drop singular values below this fraction of "
                                             "each module's largest (0: none)")
    lora_dtype = knobs[2].selectbox("Stored as", ["float32", "float16", "bfloat16"],
                                    key="export_lora_dtype")
    lora_embed = knobs[3].checkbox("Embeddings and head as LoRA too", key="export_lora_embed")
    lora_save = st.text_input("Modules stored whole (comma separated, e.g. lm_head)",
                              key="export_lora_save")
    lora_name = st.text_input("Output folder name", key="export_lora_name")
    extract = st.form_submit_button("Extract and export")
if extract:
    from pydantic import ValidationError

    from engine.lora.extract import ExtractOptions
    from engine.paths import resolve_user_path

    try:
        out = new_export_folder(lora_name)
        base_dir = resolve_user_path(lora_base, settings.allowed_roots(), kind="dir")
        ft_dir = resolve_user_path(lora_ft, settings.allowed_roots(), kind="dir")
        options = ExtractOptions(rank=int(lora_rank), sv_cutoff=float(lora_cutoff) or None,
                                 embed_lora=bool(lora_embed), dtype=lora_dtype,
                                 save_modules=[m.strip() for m in lora_save.split(",") if m.strip()])
        job_id = job_manager().submit(JobSpec(kind="extract_lora", title=f"extract-lora {lora_name}",
                                              params={"base": str(base_dir), "finetuned": str(ft_dir),
                                                      "out": str(out),
                                                      "options": options.model_dump(mode="json")}))
        st.success(f"Queued job {job_id}: follow it on the Jobs page.")
    except ValidationError as err:
        first = err.errors()[0]
        st.error(f"Cannot extract: {'.'.join(str(x) for x in first['loc'])}: {first['msg']}")
    except DeltaWorkbenchError as err:
        show_error(err, "Cannot extract")


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
        st.markdown(f"**{printable(folder.name)}** · {human_bytes(size)}")
        try:
            manifest = _manifest(folder)
        except DeltaWorkbenchError as err:
            st.warning(f"its manifest cannot be read: {err.reason}")
            manifest = None
        if isinstance(manifest, dict):
            extra = manifest.get("extra")
            kind = manifest.get("kind") or (extra.get("kind") if isinstance(extra, dict) else None)
            files = manifest.get("shards", manifest.get("files"))
            files = files if isinstance(files, (dict, list)) else []  # the manifest is hostile too
            st.caption(f"kind: {printable(kind or 'model')} · files: {len(files)}"
                       + (" · model card: README.md" if isinstance(files, dict) and "README.md" in files
                          else ""))
        if size <= DOWNLOAD_LIMIT:
            st.download_button("Download as zip", _zip(str(folder), size,
                                                        folder.stat().st_mtime),
                               file_name=f"{folder.name}.zip", mime="application/zip",
                               key=f"dl-{folder.name}")
        else:
            st.caption(f"Too large to download here (over {human_bytes(DOWNLOAD_LIMIT)}); "
                       "copy the folder instead.")
