"""Delta compression: compressors in a registry, a real on-disk artifact, rebuild and serving.

``compress(base, finetuned, out, method, ratio=...)`` writes an artifact folder (see
``engine.compress.artifact``); ``decompress(artifact, base, out)`` rebuilds a Hugging Face
folder; ``rebuild_state_dict`` rebuilds in memory; ``DeltaServer`` holds one base and many
compressed fine-tunes. Methods: ``list_methods()`` / ``get_method(name)``.
"""

from engine.compress.artifact import Artifact, check_base, folder_bytes
from engine.compress.encode import CompressResult, compress
from engine.compress.rebuild import DecompressResult, decompress, rebuild_state_dict
from engine.compress.registry import get_method, list_methods
from engine.compress.serve import DeltaServer

__all__ = ["Artifact", "CompressResult", "DecompressResult", "DeltaServer", "check_base", "compress",
           "decompress", "folder_bytes", "get_method", "list_methods", "rebuild_state_dict"]
