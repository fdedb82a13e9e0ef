"""Merge methods: pure per-tensor functions with pydantic parameter classes, and their registry."""

from engine.merge.registry import MergeMethod, default_method, get_method, list_methods

__all__ = ["MergeMethod", "default_method", "get_method", "list_methods"]
