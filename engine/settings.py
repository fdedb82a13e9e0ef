"""Where the workbench reads and writes: zoo, allowed model roots, cache, exports.

Every path a user types is resolved against ``allowed_roots()`` (see engine.paths); anything
outside is refused. Roots come from the environment so that a deployment can widen them
without code changes:

- ``DELTA_WORKBENCH_ZOO``: the demo zoo folder (default ``~/.cache/delta_workbench/zoo``).
- ``DELTA_WORKBENCH_MODEL_ROOTS``: extra folders of user models, separated by ``os.pathsep``.
- ``DELTA_WORKBENCH_EXPORT_DIR``: where exports go (default ``~/.cache/delta_workbench/exports``).
- ``DELTA_WORKBENCH_CACHE``: the DuckDB metric cache file (default
  ``~/.cache/delta_workbench/metrics.duckdb``, i.e. under ``DELTA_WORKBENCH_HOME``).
- ``DELTA_WORKBENCH_ALLOW_REMOTE=1``: let the app serve on an address other than loopback.
- ``DELTA_WORKBENCH_IN_PROCESS_MAX_PARAMS``: the largest model (parameters) a page analyses or
  compresses in the app's own process (default 50,000,000); bigger ones run as background jobs.
"""

from __future__ import annotations

import os
from pathlib import Path


IN_PROCESS_MAX_PARAMS_ENV = "DELTA_WORKBENCH_IN_PROCESS_MAX_PARAMS"
IN_PROCESS_MAX_PARAMS_DEFAULT = 50_000_000  # the demo zoo's models are far below it


def in_process_max_params() -> int:
    """Models up to this many parameters are computed in the app's process; above it, a page
    offers a background job instead (one setting for every page)."""
    raw = os.environ.get(IN_PROCESS_MAX_PARAMS_ENV, "").strip()
    if not raw:
        return IN_PROCESS_MAX_PARAMS_DEFAULT
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        value = -1
    if value < 0:
        from engine.errors import ConfigError

        raise ConfigError(f"{IN_PROCESS_MAX_PARAMS_ENV}={raw!r} is not a count of parameters "
                          "(a non-negative integer)")
    return value


def workbench_home() -> Path:
    return Path(os.environ.get("DELTA_WORKBENCH_HOME", Path.home() / ".cache" / "delta_workbench"))


def zoo_dir() -> Path:
    from engine.zoo import default_zoo_dir

    return default_zoo_dir()


def export_dir() -> Path:
    return Path(os.environ.get("DELTA_WORKBENCH_EXPORT_DIR", workbench_home() / "exports"))


def cache_path() -> Path:
    """The metric cache database file: ``$DELTA_WORKBENCH_CACHE`` or ``<home>/metrics.duckdb``.

    Taken as written (``~`` is not expanded); the store checks it (``cache.store.cache_file_path``)."""
    value = os.environ.get("DELTA_WORKBENCH_CACHE", "").strip()
    return Path(value) if value else workbench_home() / "metrics.duckdb"


def artifacts_dir() -> Path:
    """Where the Compression lab writes its artifacts."""
    return workbench_home() / "artifacts"


def jobs_dir() -> Path:
    """Where background jobs keep their folders (spec, status, log, result)."""
    return workbench_home() / "jobs"


def model_roots() -> list[Path]:
    raw = os.environ.get("DELTA_WORKBENCH_MODEL_ROOTS", "")
    return [Path(p) for p in raw.split(os.pathsep) if p.strip()]


def allowed_roots() -> list[Path]:
    """Folders under which user-typed model paths are accepted (zoo, exports, configured roots)."""
    return [zoo_dir(), export_dir(), *model_roots()]


ALLOW_REMOTE_ENV = "DELTA_WORKBENCH_ALLOW_REMOTE"


def is_loopback(address: str | None) -> bool:
    """Whether a server address binds the loopback interface only (an empty address binds
    every interface)."""
    import ipaddress

    address = (address or "").strip().strip("[]")
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False  # empty, or a host name that may resolve to any interface
