"""Text from hostile inputs (tensor, shard, file names), made safe to show.

A name in a safetensors header or a folder listing can hold escape sequences that clear or
rewrite a terminal, newlines that forge extra output lines, or bidi overrides that reorder
what a reader sees. Everything printed or shown goes through ``printable`` first.
"""

from __future__ import annotations


def printable(text) -> str:
    """``text`` with every non-printable character (control, format, separator other than the
    plain space) written as a Python escape (``\\x1b``, ``\\u202e``); printable text unchanged."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
                   for ch in text)
