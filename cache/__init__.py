"""DuckDB metric cache (see ``cache.store``): keys that make staleness impossible, one writer,
corrupt files moved aside and rebuilt."""

from cache.store import (SCHEMA_VERSION, CacheKey, MetricStore, canonical_json, default_path,
                         fingerprint_key, open_store)

__all__ = ["SCHEMA_VERSION", "CacheKey", "MetricStore", "canonical_json", "default_path",
           "fingerprint_key", "open_store"]
