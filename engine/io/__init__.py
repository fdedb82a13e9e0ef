"""Checkpoint I/O: a validated lazy reader and a staged, verified, atomic writer."""

from engine.io.reader import ModelFolder, TensorInfo
from engine.io.staging import sweep_orphan_staging
from engine.io.writer import ModelWriter

__all__ = ["ModelFolder", "ModelWriter", "TensorInfo", "sweep_orphan_staging"]
