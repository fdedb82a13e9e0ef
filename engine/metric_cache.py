"""The metric cache as the engine sees it: one key rule, one interface, and its two views.

A row's key is ``(fingerprint, tensor, metric, params, engine_version)``:

* ``fingerprint``: sha256 of the canonical JSON of the input files' fingerprints (file name,
  size, mtime_ns, header sha256, from ``ModelFolder.file_fingerprints()``), in order: the
  base shard and the fine-tune shard(s) that hold the tensor. A rewritten or touched file has
  a new mtime, so a new key: a stale value can never be returned.
* ``params``: canonical JSON of exactly the parameters the metric depends on.
* ``engine_version``: bumped when a metric's definition or numerics change.

Anything the engine takes as ``cache=`` follows ``MetricCache`` (``cache.MetricStore`` does,
as do the two views below). The engine never opens a database itself; the app process is the
database's only writer.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping, NamedTuple, Protocol, Sequence, runtime_checkable


class CacheKey(NamedTuple):
    """A row's key; equal to (and hashed like) the plain 5-tuple, which callers may pass."""

    fingerprint: str
    tensor: str
    metric: str
    params: str
    engine_version: str


def canonical_json(value: Any) -> str:
    """Stable JSON text (sorted keys, no spaces)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint_key(*files: dict | Sequence[dict]) -> str:
    """sha256 of the canonical JSON of one or more file fingerprints (order matters)."""
    return hashlib.sha256(canonical_json(list(files)).encode()).hexdigest()


@runtime_checkable
class MetricCache(Protocol):
    """What the engine's ``cache=`` argument must offer."""

    path: Any
    status: str | None
    enabled: bool
    warnings: list[str]

    def get_many(self, keys: Iterable[tuple]) -> Mapping[tuple, Any]:
        """The cached values of those keys that are present."""

    def put_many(self, items: Iterable[tuple[tuple, Any]]) -> int:
        """Store ``(key, value)`` rows; the number written."""


class NotCached(Exception):
    """A value asked of a ``ReadOnlyView`` is not in the store (and must not be computed)."""


class ReadOnlyView:
    """The store, read only: every key asked for must be there, else ``NotCached`` is raised
    before any tensor is read (a page showing a big model's metrics that a job computed)."""

    enabled = True

    def __init__(self, store: MetricCache):
        self.store = store
        self.path = getattr(store, "path", None)
        self.status = getattr(store, "status", None)
        self.warnings: list[str] = []

    def get_many(self, keys) -> dict:
        keys = list(keys)
        found = self.store.get_many(keys)
        if len(found) < len({tuple(k) for k in keys}):
            raise NotCached(f"{len(keys) - len(found)} of {len(keys)} values are not cached")
        return found

    def put_many(self, items) -> int:  # noqa: ARG002 - nothing is computed through this view
        return 0


class RecordingCache:
    """Holds nothing and records every row the engine would write: a worker process never
    opens the database; it hands ``rows`` back as its result and the app ingests them."""

    enabled = True
    path = None
    status = "recording"

    def __init__(self):
        self.rows: list[list] = []
        self.warnings: list[str] = []

    def get_many(self, keys) -> dict:  # noqa: ARG002 - nothing is cached in a worker
        return {}

    def put_many(self, items) -> int:
        count = 0
        for key, value in items:
            self.rows.append([*key, value])
            count += 1
        return count


def recorded_rows(result: Mapping) -> list[tuple[CacheKey, Any]]:
    """The ``(key, value)`` rows of a job result that carried ``RecordingCache.rows``; rows of
    any other shape are skipped."""
    return [(CacheKey(*row[:5]), row[5]) for row in result.get("rows", [])
            if isinstance(row, list) and len(row) == 6]
