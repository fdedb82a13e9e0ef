"""VisionFuse: training-free fusion of a multimodal family (members sharing one text LM).

- ``fuse(base, models, out, method=..., params=..., weights=...)`` writes a fused folder;
- ``load(DIR)`` reads it back as a ``FusedVisionModel`` (``.lm``, ``.streams``, ``.score()``):
  the one documented call that loads a fused model (no transformers class has several
  encoders);
- ``evaluate_multimodal(DIR)`` scores a fused folder or a LLaVA member on the zoo's vision
  tasks (and the LM's text tasks); ``engine eval DIR`` calls it.
"""

from engine.visionfuse.bundle import FusedVisionModel, is_bundle, load
from engine.visionfuse.evaluate import evaluate_multimodal, is_multimodal
from engine.visionfuse.fuse import DEFAULT_METHOD, fuse, merge_language_models

__all__ = ["DEFAULT_METHOD", "FusedVisionModel", "evaluate_multimodal", "fuse", "is_bundle",
           "is_multimodal", "load", "merge_language_models"]
