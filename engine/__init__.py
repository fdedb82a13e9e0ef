"""Delta Workbench engine: checkpoint I/O, delta analysis, merging, compression, evaluation."""

__version__ = "0.1.0"
