"""Bounded parsing of YAML and JSON text that comes from users (recipes, ``--param`` values,
the pages' JSON boxes).

Such text is hostile until parsed: a few hundred bytes of YAML anchors and aliases expand to
gigabytes once written out, deep nesting exhausts the Python stack, and a long sexagesimal
integer (``1:0:0:...``) costs minutes of big-integer arithmetic. So the YAML loader refuses
anchors, aliases and merge keys (a recipe has no use for them), duplicate keys (the second
would silently win), nesting deeper than ``MAX_DEPTH``, more than ``MAX_NODES`` values and
integers longer than ``MAX_INT_CHARS``; the text itself is capped at ``MAX_TEXT_BYTES``. Every refusal is one line
naming the source and the line.
"""

from __future__ import annotations

from typing import Any

import yaml

from engine.errors import ConfigError, DeltaWorkbenchError

MAX_TEXT_BYTES = 256 * 2**10  # a recipe is a few kilobytes
MAX_DEPTH = 64
MAX_NODES = 20_000  # the pure-Python parser takes about a second per 20,000 nodes
MAX_INT_CHARS = 100

_MERGE_TAG = "tag:yaml.org,2002:merge"


def _line(node_or_event) -> int:
    return node_or_event.start_mark.line + 1


class StrictYamlLoader(yaml.SafeLoader):
    """yaml.SafeLoader without anchors, aliases, merge keys or duplicate keys, depth-bounded.

    Build it with ``StrictYamlLoader(text, source=..., error=...)``; ``parse_yaml`` does."""

    def __init__(self, stream, *, source: str = "text", error: type[DeltaWorkbenchError] = ConfigError,
                 max_depth: int = MAX_DEPTH):
        super().__init__(stream)
        self._source, self._error, self._max_depth, self._depth = source, error, max_depth, 0
        self._nodes = 0

    def _refuse(self, message: str, where) -> DeltaWorkbenchError:
        return self._error(f"{message} (line {_line(where)})", path=self._source)

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise self._refuse(f"alias *{event.anchor}: YAML anchors and aliases are refused", event)
        if getattr(event, "anchor", None) is not None:
            raise self._refuse(f"anchor &{event.anchor}: YAML anchors and aliases are refused", event)
        # Counted here, before the composer recurses: a 3,000-deep document stops at the limit
        # instead of running out of Python stack.
        self._depth += 1
        self._nodes += 1
        try:
            if self._nodes > MAX_NODES:
                raise self._refuse(f"more than {MAX_NODES} values", event)
            if self._depth > self._max_depth:
                raise self._refuse(f"nested deeper than {self._max_depth} levels", event)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:
                    raise self._refuse("merge key '<<' is refused", key_node)
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.get(key)
                except TypeError:
                    raise self._refuse("a mapping key must be a scalar", key_node) from None
                if first is not None:
                    raise self._refuse(f"duplicate key {key!r} (first at line {first})", key_node)
                seen[key] = _line(key_node)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        if len(node.value) > MAX_INT_CHARS:
            raise self._refuse(f"integer of {len(node.value)} characters is too long", node)
        return super().construct_yaml_int(node)


StrictYamlLoader.add_constructor("tag:yaml.org,2002:int", StrictYamlLoader.construct_yaml_int)


def _check_size(text: str | bytes, source: str, error, max_bytes: int | None) -> str:
    size = len(text) if isinstance(text, bytes) else len(text.encode("utf-8", "surrogatepass"))
    if max_bytes is not None and size > max_bytes:
        raise error(f"{size} bytes is too large (at most {max_bytes})", path=source)
    if isinstance(text, bytes):
        try:
            return text.decode("utf-8")
        except UnicodeDecodeError as err:
            raise error(f"not UTF-8 text (byte {err.start})", path=source) from None
    return text


def parse_yaml(text: str | bytes, *, source: str = "text",
               error: type[DeltaWorkbenchError] = ConfigError,
               max_bytes: int | None = MAX_TEXT_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """YAML text (or UTF-8 bytes) to plain data, with the refusals of the module docstring;
    every problem is ``error`` naming ``source``."""
    text = _check_size(text, source, error, max_bytes)
    loader = StrictYamlLoader(text, source=source, error=error, max_depth=max_depth)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise error(f"not valid YAML: {problem}{where}", path=source) from None
    except (ValueError, OverflowError) as err:  # a scalar the safe constructors cannot convert
        raise error(f"not valid YAML: {err}", path=source) from None
    finally:
        loader.dispose()


def parse_yaml_documents(text: str | bytes, *, source: str = "text",
                         error: type[DeltaWorkbenchError] = ConfigError,
                         max_bytes: int | None = MAX_TEXT_BYTES, max_depth: int = MAX_DEPTH) -> list[Any]:
    """Every document of a YAML stream (``---`` separated: a multi-stage recipe), each read with
    the refusals of ``parse_yaml`` (the size and value bounds count over the whole text)."""
    text = _check_size(text, source, error, max_bytes)
    loader = StrictYamlLoader(text, source=source, error=error, max_depth=max_depth)
    docs = []
    try:
        while loader.check_data():
            docs.append(loader.get_data())
        return docs
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise error(f"not valid YAML: {problem}{where}", path=source) from None
    except (ValueError, OverflowError) as err:
        raise error(f"not valid YAML: {err}", path=source) from None
    finally:
        loader.dispose()


def _too_deep(data: Any, max_depth: int) -> bool:
    stack = [(data, 1)]  # iterative: the check itself must not exhaust the stack
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > max_depth:
                return True
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
    return False


def parse_json(text: str | bytes, *, source: str = "text",
               error: type[DeltaWorkbenchError] = ConfigError,
               max_bytes: int | None = MAX_TEXT_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """JSON text to plain data: size- and depth-bounded, duplicate keys and NaN refused."""
    from engine.io.header import DuplicateKeyError, loads_strict_json

    text = _check_size(text, source, error, max_bytes)
    try:
        data = loads_strict_json(text)
    except DuplicateKeyError as dup:
        raise error(f"duplicate key {dup.key!r}", path=source) from None
    except RecursionError:
        raise error(f"nested deeper than {max_depth} levels", path=source) from None
    except ValueError as err:
        raise error(f"not valid JSON: {err}", path=source) from None
    if _too_deep(data, max_depth):
        raise error(f"nested deeper than {max_depth} levels", path=source)
    return data
