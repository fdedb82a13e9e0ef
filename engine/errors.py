"""Named errors of Delta Workbench.

Every error that bad input can cause is one of these, and its message names the file
(and the tensor, where there is one) so that the command line can print it as one line
and the app can show it without a traceback.
"""

from __future__ import annotations

from pathlib import Path

from engine.text import printable


class DeltaWorkbenchError(Exception):
    """Base class: every error the workbench raises on purpose."""

    def __init__(self, message: str, *, path: str | Path | None = None, tensor: str | None = None):
        self.path = str(path) if path is not None else None
        self.tensor = tensor
        self.reason = message
        parts = []
        if self.path is not None:
            parts.append(self.path)
        if tensor is not None:
            parts.append(f"tensor {tensor!r}")
        prefix = ": ".join(parts)
        # Paths, names and reasons can come from hostile files: the printed line is escaped
        # (no terminal escapes, no forged second line).
        super().__init__(printable(f"{prefix}: {message}" if prefix else message))


class CheckpointFormatError(DeltaWorkbenchError):
    """A checkpoint file or folder is malformed: truncated, inconsistent header, bad index."""


class UnsafeFormatError(DeltaWorkbenchError):
    """A format that can run code when loaded (pickle) or asks for remote code."""


class ConfigError(DeltaWorkbenchError):
    """config.json is missing, malformed or unusable."""


class PathNotAllowedError(DeltaWorkbenchError):
    """A path outside the allowed roots, a traversal, a symlink escape, or not a regular file/folder."""


class IncompatibleModelsError(DeltaWorkbenchError):
    """Models cannot be combined; the message lists every mismatch at once."""

    def __init__(self, message: str, *, reasons: list[str] | None = None, **kw):
        self.reasons = list(reasons or [])
        super().__init__(message, **kw)


class NonFiniteError(DeltaWorkbenchError):
    """NaN or Inf where finite values are required."""


class ParameterError(DeltaWorkbenchError):
    """Method parameters that are invalid or would produce NaN (validated before any work)."""


class ExportError(DeltaWorkbenchError):
    """Writing an output folder failed; nothing was left behind."""


class ArtifactError(DeltaWorkbenchError):
    """A compressed-delta artifact is corrupt, or belongs to another base."""


class CacheError(DeltaWorkbenchError):
    """The metric cache cannot be used (for example locked by another process)."""
