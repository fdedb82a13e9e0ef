"""The one progress line every long command prints on stderr: ``[ 42.0%] what it is doing``,
rewritten in place (``\\r``), the message made printable and cut to 60 characters."""

from __future__ import annotations

import sys
from collections.abc import Callable

from engine.text import printable


def stderr_progress(quiet: bool) -> Callable[[float, str], None]:
    """A ``progress(fraction, message)`` callback; it prints nothing when ``quiet``."""

    def progress(fraction: float, message: str) -> None:
        if not quiet:
            print(f"\r[{fraction:6.1%}] {printable(message)[:60]:<60}", end="", file=sys.stderr, flush=True)

    return progress
