"""The DuckDB metric store: disposable, keyed so that a stale row can never be read.

Key of a row: ``(fingerprint, tensor, metric, params, engine_version)``, by the one rule in
``engine.metric_cache`` (what each field is, and why a stale value can never be read, is said
there; the store is one ``MetricCache``, and its read-only and recording views live beside the
rule). There is no invalidation, only garbage collection (:meth:`MetricStore.gc`).

The value is JSON text. Writes of one batch are one transaction (a crash keeps whole batches).

One writer: DuckDB lets one process hold a database file read-write and refuses every other
open, read-only too. The process that opens the store owns the connection (one per process,
shared by threads under a lock, a cursor per call). A process that finds the file locked does
not wait long and never fails: the store is *disabled* (every read misses, writes are dropped)
and ``warning`` names the holder; the caller computes without the cache. A file that DuckDB
cannot open or read (garbage, bad checksum, failed WAL replay) is moved aside as
``<name>.corrupt-<timestamp>`` (its ``.wal`` too) and rebuilt empty, with a warning; never
fatal. Only a file that is a DuckDB database (its magic bytes) or empty is ever moved aside: a
path that names anything else (a model file, a folder, a FIFO, a device) is refused with a
:class:`~engine.errors.CacheError` before anything is opened, and ``~`` is never expanded
(as for every path a user types, see engine.paths). ``read_only=True`` opens for reading only (possible when no process holds it
read-write; it then blocks writers while open).
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import duckdb

from engine.errors import CacheError
from engine.metric_cache import CacheKey, canonical_json, fingerprint_key  # the one key rule

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
_ROWS_PER_STATEMENT = 500
_LOCK_MARKERS = ("could not set lock", "conflicting lock")
_HOLDER_RE = re.compile(r"Conflicting lock is held in (.+?) \(PID (\d+)\)")
# Every DuckDB database file carries this magic at byte 8 (checked on duckdb 2.0.1).
DUCKDB_MAGIC = b"DUCK"
DUCKDB_MAGIC_OFFSET = 8


def default_path() -> Path:
    from engine.settings import cache_path

    return cache_path()


def cache_file_path(path: str | Path) -> Path:
    """The absolute path of a metric cache file, refused (CacheError) when it cannot be ours.

    ``~`` is not expanded (type the full path). What exists there must be a regular file that
    is empty or a DuckDB database: a folder, a FIFO, a socket or a device (found with stat,
    which never blocks on a FIFO) or any other file (a model, a document) is refused, so the
    cache never opens, moves aside or overwrites something that is not its own."""
    raw = str(path)
    if raw.startswith("~"):
        raise CacheError("'~' is not expanded; type the full path of the metric cache file",
                         path=raw)
    if not raw.strip() or "\x00" in raw:
        raise CacheError("not a usable metric cache path", path=repr(raw))
    resolved = Path(raw).absolute()
    for candidate in (resolved, resolved.with_name(resolved.name + ".wal")):
        _check_cache_file(candidate, is_wal=candidate is not resolved)
    return resolved


def _check_cache_file(path: Path, *, is_wal: bool) -> None:
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return  # absent: created later (a parent that cannot be made is reported then)
    except OSError as err:
        raise CacheError(f"metric cache file cannot be checked ({err.strerror or err})",
                         path=path) from None
    if stat.S_ISDIR(st.st_mode):
        raise CacheError("is a folder, not a metric cache file; refused", path=path)
    if not stat.S_ISREG(st.st_mode):
        raise CacheError("not a regular file (FIFO, socket or device); refused as the metric "
                         "cache", path=path)
    if is_wal or st.st_size == 0:
        return  # a WAL has no magic; an empty file holds nothing to lose
    try:
        with open(path, "rb") as handle:
            head = handle.read(DUCKDB_MAGIC_OFFSET + len(DUCKDB_MAGIC))
    except OSError as err:
        raise CacheError(f"metric cache file cannot be read ({err.strerror or err})",
                         path=path) from None
    if head[DUCKDB_MAGIC_OFFSET:] != DUCKDB_MAGIC:
        raise CacheError("exists and is not a DuckDB database (not a metric cache); refused, "
                         "nothing was changed", path=path)


def _is_lock_error(err: BaseException) -> bool:
    text = str(err).lower()
    return any(marker in text for marker in _LOCK_MARKERS)


def _holder(err: BaseException) -> str:
    match = _HOLDER_RE.search(str(err))
    if match:
        return f"process {match.group(2)} ({Path(match.group(1)).name})"
    return "another process"


class MetricStore:
    """A metric cache on one DuckDB file; see the module docstring."""

    def __init__(self, path: str | Path | None = None, *, read_only: bool = False,
                 lock_wait_s: float = 0.5):
        self.path = cache_file_path(path if path is not None else default_path())
        self.read_only = read_only
        self.lock_wait_s = lock_wait_s
        self.status = "closed"  # "ok" | "read-only" | "locked" | "unavailable" | "closed"
        self.warnings: list[str] = []
        self.quarantined: list[Path] = []
        self._con: duckdb.DuckDBPyConnection | None = None
        self._lock = threading.RLock()
        self._open()

    # ----------------------------------------------------------------- state
    @property
    def enabled(self) -> bool:
        return self._con is not None

    @property
    def writable(self) -> bool:
        return self._con is not None and not self.read_only

    @property
    def warning(self) -> str | None:
        return self.warnings[-1] if self.warnings else None

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        log.warning(message)

    # ----------------------------------------------------------------- opening
    def _connect(self) -> duckdb.DuckDBPyConnection:
        deadline = time.monotonic() + max(self.lock_wait_s, 0.0)
        while True:
            try:
                return duckdb.connect(str(self.path), read_only=self.read_only)
            except duckdb.Error as err:
                if not _is_lock_error(err) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    @classmethod
    def refused(cls, path: str | Path, error: CacheError) -> "MetricStore":
        """A disabled store for a path that :func:`cache_file_path` refused (the app computes
        without the cache and shows ``error``); nothing is opened."""
        store = cls.__new__(cls)
        store.path = Path(str(path))
        store.read_only = True
        store.lock_wait_s = 0.0
        store.status = "refused"
        store.warnings = [str(error)]
        store.quarantined = []
        store._con = None
        store._lock = threading.RLock()
        return store

    def _open(self) -> None:
        with self._lock:
            cache_file_path(self.path)  # the file may have been replaced since
            if self.read_only and not self.path.exists():
                self.status = "unavailable"
                self._warn(f"metric cache {self.path} does not exist yet; reading without the cache")
                return
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                self.status = "unavailable"
                self._warn(f"metric cache folder {self.path.parent} cannot be created "
                           f"({err.strerror or err}); computing without the cache")
                return
            for attempt in range(2):
                try:
                    self._con = self._connect()
                    self._ensure_schema()
                    self.status = "read-only" if self.read_only else "ok"
                    return
                except duckdb.Error as err:
                    self._drop_connection()
                    if _is_lock_error(err):
                        self.status = "locked"
                        self._warn(f"metric cache {self.path} is locked by {_holder(err)}; "
                                   "computing without the cache")
                        return
                    if attempt == 0 and not self.read_only:
                        self._quarantine(err)
                        continue
                    self.status = "unavailable"
                    self._warn(f"metric cache {self.path} cannot be used ({_short(err)}); "
                               "computing without the cache")
                    return
                except OSError as err:
                    self._drop_connection()
                    self.status = "unavailable"
                    self._warn(f"metric cache {self.path} cannot be opened ({err.strerror or err}); "
                               "computing without the cache")
                    return

    def _ensure_schema(self) -> None:
        con = self._con
        assert con is not None
        tables = {row[0] for row in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'").fetchall()}
        version = None
        if "meta" in tables:
            row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = row[0] if row else None
        if self.read_only:
            if version != SCHEMA_VERSION or "metrics" not in tables:
                raise duckdb.IOException(f"schema version {version!r}, expected {SCHEMA_VERSION}")
            return
        if version != SCHEMA_VERSION:
            # the cache is disposable: another layout is dropped, not migrated
            con.execute("DROP TABLE IF EXISTS metrics")
            con.execute("DROP TABLE IF EXISTS meta")
        con.execute("""
            CREATE TABLE IF NOT EXISTS metrics (
                fingerprint VARCHAR NOT NULL,
                tensor VARCHAR NOT NULL,
                metric VARCHAR NOT NULL,
                params VARCHAR NOT NULL,
                engine_version VARCHAR NOT NULL,
                value VARCHAR NOT NULL,
                created TIMESTAMP NOT NULL DEFAULT current_timestamp,
                PRIMARY KEY (fingerprint, tensor, metric, params, engine_version))""")
        con.execute("CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
        con.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [SCHEMA_VERSION])

    def _drop_connection(self) -> None:
        if self._con is not None:
            try:
                self._con.close()
            except duckdb.Error:
                pass
        self._con = None

    def _quarantine(self, err: BaseException) -> None:
        """Move the database (and its WAL) aside so that a fresh one can be built."""
        self._drop_connection()
        stamp = time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}-{time.monotonic_ns() % 10**6}"
        moved = []
        try:
            cache_file_path(self.path)  # never move aside what is not a database of ours
        except CacheError as refusal:
            self.status = "refused"
            self._warn(str(refusal))
            raise
        for source in (self.path, self.path.with_name(self.path.name + ".wal")):
            if source.is_file():
                target = source.with_name(f"{source.name}.corrupt-{stamp}")
                try:
                    os.replace(source, target)
                    moved.append(target)
                except OSError as move_err:
                    log.warning("cannot move %s aside: %s", source, move_err)
        self.quarantined.extend(moved)
        where = f"moved aside to {moved[0].name}" if moved else "could not be moved aside"
        self._warn(f"metric cache {self.path} was unreadable ({_short(err)}); {where} and rebuilt")

    def _recover(self, err: duckdb.Error) -> None:
        """A query failed on a damaged file: quarantine it and start a fresh one."""
        if _is_lock_error(err) or self.read_only:
            self._drop_connection()
            self.status = "unavailable"
            self._warn(f"metric cache {self.path} failed ({_short(err)}); continuing without it")
            return
        self._quarantine(err)
        self._open()

    # ----------------------------------------------------------------- reading and writing
    def get_many(self, keys: Iterable[CacheKey]) -> dict[CacheKey, Any]:
        """Values of the keys that are cached (decoded JSON); missing keys are absent."""
        wanted = {CacheKey(*k) for k in keys}
        if not wanted:
            return {}
        with self._lock:
            if self._con is None:
                return {}
            groups: dict[tuple[str, str, str], set[str]] = {}
            for key in wanted:
                groups.setdefault((key.metric, key.params, key.engine_version), set()).add(key.fingerprint)
            found: dict[CacheKey, Any] = {}
            try:
                cursor = self._con.cursor()
                try:
                    for (metric, params, version), fps in groups.items():
                        fp_list = sorted(fps)
                        marks = ",".join("?" * len(fp_list))
                        rows = cursor.execute(
                            "SELECT fingerprint, tensor, value FROM metrics WHERE metric = ? AND "
                            f"params = ? AND engine_version = ? AND fingerprint IN ({marks})",
                            [metric, params, version, *fp_list]).fetchall()
                        for fp, tensor, value in rows:
                            key = CacheKey(fp, tensor, metric, params, version)
                            if key in wanted:
                                found[key] = json.loads(value)
                finally:
                    cursor.close()
            except duckdb.Error as err:
                self._recover(err)
                return {}
            except (ValueError, TypeError) as err:  # undecodable value: the file is damaged
                self._recover(duckdb.Error(f"undecodable row: {err}"))
                return {}
            return found

    def get(self, key: CacheKey) -> Any | None:
        return self.get_many([key]).get(key)

    def put_many(self, items: Iterable[tuple[CacheKey, Any]]) -> int:
        """Store values (JSON-serialisable) in one transaction; returns rows written (0 when
        the store is disabled or read-only)."""
        unique = {CacheKey(*k): json.dumps(v, allow_nan=False) for k, v in items}  # last one wins
        rows = [(*k, v) for k, v in unique.items()]
        if not rows:
            return 0
        with self._lock:
            for attempt in range(2):
                if self._con is None or self.read_only:
                    return 0
                cursor = None
                try:
                    cursor = self._con.cursor()
                    cursor.execute("BEGIN TRANSACTION")
                    # multi-row VALUES: DuckDB's executemany runs one statement per row (slow)
                    for start in range(0, len(rows), _ROWS_PER_STATEMENT):
                        chunk = rows[start:start + _ROWS_PER_STATEMENT]
                        marks = ",".join(["(?, ?, ?, ?, ?, ?)"] * len(chunk))
                        cursor.execute(
                            "INSERT OR REPLACE INTO metrics (fingerprint, tensor, metric, params, "
                            f"engine_version, value) VALUES {marks}",
                            [part for row in chunk for part in row])
                    cursor.execute("COMMIT")
                    return len(rows)
                except duckdb.Error as err:
                    if cursor is not None:
                        try:
                            cursor.execute("ROLLBACK")
                        except duckdb.Error:
                            pass
                    if attempt == 0:
                        self._recover(err)
                        continue
                    self._warn(f"metric cache {self.path}: write failed ({_short(err)}); rows dropped")
                    return 0
                finally:
                    if cursor is not None:
                        try:
                            cursor.close()
                        except duckdb.Error:
                            pass
        return 0

    def put(self, key: CacheKey, value: Any) -> int:
        return self.put_many([(key, value)])

    # ----------------------------------------------------------------- housekeeping
    def stats(self) -> dict:
        """Rows per metric, file size and state (for the sidebar)."""
        size = self.path.stat().st_size if self.path.exists() else 0
        out = {"path": str(self.path), "status": self.status, "bytes": size, "rows": 0, "metrics": {}}
        with self._lock:
            if self._con is None:
                return out
            try:
                cursor = self._con.cursor()
                try:
                    rows = cursor.execute(
                        "SELECT metric, count(*) FROM metrics GROUP BY metric ORDER BY metric").fetchall()
                finally:
                    cursor.close()
            except duckdb.Error as err:
                self._recover(err)
                return out
        out["metrics"] = {m: int(c) for m, c in rows}
        out["rows"] = sum(out["metrics"].values())
        return out

    def gc(self, *, keep_engine_versions: Sequence[str] | None = None,
           older_than_s: float | None = None) -> int:
        """Delete rows of other engine versions and/or older than ``older_than_s``; returns the
        number of rows deleted."""
        clauses, args = [], []
        if keep_engine_versions is not None:
            marks = ",".join("?" * len(keep_engine_versions)) or "NULL"
            clauses.append(f"engine_version NOT IN ({marks})")
            args.extend(keep_engine_versions)
        if older_than_s is not None:
            clauses.append("created < current_timestamp - to_seconds(?)")
            args.append(float(older_than_s))
        if not clauses:
            return 0
        with self._lock:
            if not self.writable:
                return 0
            try:
                cursor = self._con.cursor()
                before = cursor.execute("SELECT count(*) FROM metrics").fetchone()[0]
                cursor.execute("DELETE FROM metrics WHERE " + " OR ".join(clauses), args)
                after = cursor.execute("SELECT count(*) FROM metrics").fetchone()[0]
                cursor.execute("CHECKPOINT")
                return int(before - after)
            except duckdb.Error as err:
                self._recover(err)
                return 0

    def clear(self) -> None:
        with self._lock:
            if self.writable:
                try:
                    self._con.cursor().execute("DELETE FROM metrics")
                except duckdb.Error as err:
                    self._recover(err)

    def reopen(self) -> "MetricStore":
        """Try again (e.g. after the holder of the lock has gone)."""
        with self._lock:
            self._drop_connection()
            self.status = "closed"
            self._open()
        return self

    def close(self) -> None:
        with self._lock:
            self._drop_connection()
            self.status = "closed"

    def __enter__(self) -> "MetricStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MetricStore({str(self.path)!r}, status={self.status!r})"


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


_STORES: dict[Path, MetricStore] = {}
_STORES_LOCK = threading.Lock()


def open_store(path: str | Path | None = None) -> MetricStore:
    """The process's store for ``path`` (default: ``DELTA_WORKBENCH_CACHE``), opened once and
    shared; a closed one is reopened."""
    resolved = cache_file_path(path if path is not None else default_path())
    with _STORES_LOCK:
        store = _STORES.get(resolved)
        if store is None or store.status == "closed":
            store = MetricStore(resolved)
            _STORES[resolved] = store
        return store
