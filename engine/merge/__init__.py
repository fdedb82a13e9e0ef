"""Merge methods: pure per-tensor functions with pydantic parameter classes, and their registry."""

from engine.merge.registry import MergeMethod, get_method, list_methods

__all__ = ["MergeMethod", "get_method", "list_methods"]
