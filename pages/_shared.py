"""Glue shared by the pages: one job manager and one metric store per server process, the
model selection in session state, and small display helpers. No tensors here."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from engine import settings
from engine.errors import DeltaWorkbenchError
from engine.text import printable

SELECTION_KEY = "selection"  # {"base": str | None, "finetunes": [str, ...]} (plain, serialisable)
EVAL_SETS_KEY = "eval_sets"  # [str, ...]: the user's JSONL/text eval files, registered on Models
APP_RAN_KEY = "_app_ran"  # set by app.py on every run, before the page runs
DEEP_LINK_KEY = "_deep_link"  # a page asked for before app.py had ever run


def require_app(page: str) -> None:
    """Run ``page`` only under app.py's navigation.

    On a freshly started server, a first request for a page's URL (a bookmark, a reload) can
    reach Streamlit before app.py has ever called ``st.navigation``; Streamlit then falls back
    to treating every file in pages/ as a page and runs this one alone (wrong menu, no sidebar).
    The page then hands over to app.py, which builds the real navigation and opens the page.
    """
    if not st.session_state.get(APP_RAN_KEY):
        st.session_state[DEEP_LINK_KEY] = page
        st.switch_page("app.py")


def job_manager():
    """The process's job manager (one per jobs folder: settings may differ between tests)."""
    return _job_manager_for(str(settings.jobs_dir()))


@st.cache_resource
def _job_manager_for(jobs_dir: str):
    from engine.jobs import JobManager

    return JobManager(jobs_dir)


def startup_sweep() -> list[str]:
    return _sweep_once(str(settings.workbench_home()))


@st.cache_resource
def _sweep_once(home: str) -> list[str]:  # noqa: ARG001 - keyed by home: once per home and process
    """Once per server process: remove staging folders orphaned by a crash or a kill, in
    every staging area (the same sweep as the CLI's and the job worker's)."""
    from engine.io.staging import sweep_all_staging

    return [str(p) for p in sweep_all_staging()]


def zoo_manifest() -> dict | None:
    from engine.zoo import load_manifest

    zoo = settings.zoo_dir()
    if not (zoo / "zoo.json").is_file():
        return None
    try:
        return load_manifest(zoo)
    except DeltaWorkbenchError as err:
        st.error(f"The demo zoo cannot be read: {err}")
        return None


def default_selection(manifest: dict | None) -> dict:
    """The zoo's small family: its base and every fine-tune of it."""
    if manifest is None:
        return {"base": None, "finetunes": []}
    zoo = settings.zoo_dir()
    models = manifest["models"]
    base = next((m for m in models if m["family"] == "small" and m["role"] == "base"), None)
    if base is None:
        return {"base": None, "finetunes": []}
    # same family: the mllm family's LLaVA members also descend from small/base
    fts = [m for m in models if m.get("parent") == base["path"] and m["role"] == "finetune"
           and m.get("family") == base["family"]]
    return {"base": str(zoo / base["path"]), "finetunes": [str(zoo / m["path"]) for m in fts]}


def selection() -> dict:
    """The selected base and fine-tunes (absolute folder paths), defaulting to the zoo."""
    if SELECTION_KEY not in st.session_state or not st.session_state[SELECTION_KEY].get("base"):
        st.session_state[SELECTION_KEY] = default_selection(zoo_manifest())
    return st.session_state[SELECTION_KEY]


def require_selection(min_finetunes: int = 1) -> dict:
    """The selection; when it does not have enough models, a message and the page stops."""
    chosen = selection()
    if not chosen.get("base") or len(chosen.get("finetunes", [])) < min_finetunes:
        st.info(f"Pick a base and at least {min_finetunes} fine-tune(s) on the Models page "
                "(or build the demo zoo there).")
        st.stop()
    return chosen


def eval_files() -> tuple[str, ...]:
    """The eval files registered on the Models page (paths already checked against the roots)."""
    return tuple(st.session_state.get(EVAL_SETS_KEY, []))


def scoring(base: str) -> dict:
    """What a merge or a rebuild of models over ``base`` is scored on: the zoo's tasks when the
    base is a zoo model (``tasks=None``), the registered eval files always (their held-out
    half). A model from outside the zoo with no eval file: a message, and the page stops."""
    in_zoo = Path(base).resolve().is_relative_to(settings.zoo_dir().resolve())
    files = eval_files()
    if not in_zoo and not files:
        st.info("These models are not the demo zoo's: register an eval set (a JSONL file of "
                "prompt/answer lines, or a text file) on the Models page to score them.")
        st.stop()
    return {"tasks": None if in_zoo else [], "eval_files": files}


def parameter_count(path: str, base: str) -> int:
    """Parameters of a model folder, or of a LoRA adapter's model (its base's)."""
    from engine.lora.finetune import parameter_count as count

    return count(path, base)


def short_name(path: str | Path) -> str:
    """``family/model`` for zoo folders, the folder name otherwise (escaped: a folder name can
    hold control or bidi characters)."""
    path = Path(path)
    try:
        return printable(path.relative_to(settings.zoo_dir()))
    except ValueError:
        return printable(path.name)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def new_export_folder(name: str) -> Path:
    """``<export dir>/name`` for a new export (the export dir is created); refuses a name that
    is not a plain folder name or a folder that already exists."""
    from engine.errors import ConfigError

    name = (name or "").strip()
    if (not name or any(c in name for c in "/\\\x00") or name.startswith(".")
            or ".." in name):
        raise ConfigError("give a plain folder name (no '/', not starting with '.')")
    out = settings.export_dir() / name
    if out.exists():
        raise ConfigError("already exists: choose another name", path=out)
    settings.export_dir().mkdir(parents=True, exist_ok=True)
    return out


def show_error(err: Exception, what: str = "") -> None:
    """A workbench error as one clear line on the page (never a traceback)."""
    prefix = f"{what}: " if what else ""
    st.error(f"{prefix}{err}")
