"""The fused model on disk and in memory.

A VisionFuse folder holds:

- ``visionfuse.json``: the manifest: format and version, the LM folder, the ordered encoder
  folders (each with its token count and image view), the token order
  (``[<bos>; encoder 0 tokens; ...; encoder k-1 tokens; text]``), the merge that made the LM
  (method, parameters, base, members) and the pruning setting (none: every token is kept);
- ``lm/``: the merged language model, a plain ``LlamaForCausalLM`` folder with the base's
  tokenizer (``engine eval DIR/lm`` scores its text tasks alone);
- ``encoders/<i>/``: member i's vision tower (``vision_tower.*``) and projector
  (``multi_modal_projector.*``) unmerged, with the member's LLaVA config and view.

``load(DIR)`` returns a ``FusedVisionModel``; no transformers class holds several encoders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.errors import ConfigError
from engine.evaluate.vision_scoring import VisualStream
from engine.evaluate.vision_tasks import ImageView

MANIFEST = "visionfuse.json"
FORMAT = "delta_workbench.visionfuse"
VERSION = 1
TOKEN_ORDER = "bos, then each encoder's tokens in manifest order, then the text"
TOWER, PROJECTOR = "vision_tower.", "multi_modal_projector."


@dataclass
class FusedVisionModel:
    """One LM reading the concatenated visual tokens of every stream."""

    lm: torch.nn.Module
    streams: list[VisualStream]
    manifest: dict = field(default_factory=dict)

    def score(self, tasks=None, n_per_task=None, *, keep=None, with_predictions: int = 0) -> dict:
        from engine.evaluate.vision_scoring import score_vision

        return score_vision(self.lm, self.streams, tasks, n_per_task, keep=keep,
                            with_predictions=with_predictions)

    def to(self, device):
        self.lm.to(device)
        for s in self.streams:
            s.vision_tower.to(device)
            s.projector.to(device)
        return self


def is_bundle(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def encoder_parts(llava_model) -> dict[str, torch.Tensor]:
    """A LLaVA member's encoder and projector tensors, under the bundle's names."""
    out = {}
    for name, tensor in llava_model.state_dict().items():
        short = name[len("model."):] if name.startswith("model.") else name
        if short.startswith((TOWER, PROJECTOR)):
            out[short] = tensor
    return out


def _read_manifest(root: Path) -> dict:
    from engine.io.reader import _read_small_json, _regular_file_inside

    raw = _read_small_json(_regular_file_inside(root, MANIFEST, "visionfuse manifest"),
                           ConfigError, "visionfuse manifest")
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or raw.get("version") != VERSION:
        raise ConfigError(f"{MANIFEST} is not a version-{VERSION} VisionFuse manifest", path=root)
    encoders = raw.get("encoders")
    if raw.get("lm") != "lm" or not isinstance(encoders, list) or not encoders:
        raise ConfigError(f"{MANIFEST} names no LM folder or no encoders", path=root)
    for i, enc in enumerate(encoders):
        if not isinstance(enc, dict) or enc.get("folder") != f"encoders/{i}":
            raise ConfigError(f"{MANIFEST}: encoder {i} is not in encoders/{i}", path=root)
    return raw


def _load_stream(folder: Path) -> VisualStream:
    from transformers import AutoModel, LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    from engine.evaluate.scoring import _load_strict
    from engine.io import ModelFolder
    from engine.io.reader import refuse_unsafe_config
    from engine.zoo.mllm import read_view

    with ModelFolder(folder, check_finite=True) as stored:
        config = dict(stored.config)
        refuse_unsafe_config(config, stored.path / "config.json", "config")
        for key in ("transformers_version", "torch_dtype", "dtype", "auto_map"):
            config.pop(key, None)
        cfg = LlavaConfig.from_dict(config)
        tower = AutoModel.from_config(cfg.vision_config, trust_remote_code=False).float()
        projector = LlavaMultiModalProjector(cfg).float()
        tensors = {n: stored.get_tensor(n) for n in stored.tensor_names}
    bad = [n for n in tensors if not n.startswith((TOWER, PROJECTOR))]
    if bad:
        raise ConfigError("encoder folder holds a tensor that is neither tower nor projector",
                          path=folder, tensor=bad[0])
    _load_strict(tower, {n[len(TOWER):]: t for n, t in tensors.items() if n.startswith(TOWER)},
                 path=folder)
    proj = {n[len(PROJECTOR):]: t for n, t in tensors.items() if n.startswith(PROJECTOR)}
    own = projector.state_dict()
    if set(proj) != set(own) or any(proj[n].shape != own[n].shape for n in own):
        raise ConfigError("the projector's tensors do not fit the config's projector "
                          f"(have {sorted(proj)[:4]}, want {sorted(own)[:4]})", path=folder)
    projector.load_state_dict(proj)
    return VisualStream(tower.eval(), projector.eval(), read_view(folder),
                        cfg.vision_feature_layer)


def load(path: str | Path) -> FusedVisionModel:
    """The fused model of a VisionFuse folder (weights through the validating reader)."""
    from engine.evaluate.loading import load_model_folder

    root = Path(path).resolve()
    if not is_bundle(root):
        raise ConfigError(f"not a VisionFuse folder: no {MANIFEST}", path=root)
    manifest = _read_manifest(root)
    lm, _ = load_model_folder(root / "lm")
    streams = [_load_stream(root / enc["folder"]) for enc in manifest["encoders"]]
    return FusedVisionModel(lm.eval(), streams, manifest)


def manifest_json(encoders: list[dict], merge: dict) -> bytes:
    return json.dumps({"format": FORMAT, "version": VERSION, "lm": "lm", "encoders": encoders,
                       "token_order": TOKEN_ORDER, "merge": merge,
                       "pruning": {"keep_ratio": 1.0}}, indent=2).encode()


def view_of(stream: VisualStream) -> ImageView:
    return stream.view
