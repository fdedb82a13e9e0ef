"""Open and check the inputs of a VisionFuse fusion: a shared text LM and its LLaVA members.

A member must be a LLaVA folder (``model_type: llava``) with an ``image_view.json``; its
language model (``model.language_model.*`` + ``lm_head``) must have exactly the base LM's
tensor names and shapes and the base's vocabulary. Anything else is refused in one line that
names the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from engine.errors import ConfigError, ParameterError
from engine.evaluate.vision_tasks import ImageView


@dataclass
class Member:
    path: Path
    model: object  # LlavaForConditionalGeneration
    view: ImageView

    @property
    def lm_state(self) -> dict[str, torch.Tensor]:
        from engine.zoo.mllm import lm_state_of

        return lm_state_of(self.model.state_dict())


def is_llava_folder(path: str | Path) -> bool:
    """Whether ``path`` holds a config.json naming the LLaVA architecture (cheap: config only)."""
    from engine.io.reader import _read_small_json

    config = Path(path) / "config.json"
    if not config.is_file() or config.is_symlink():
        return False
    raw = _read_small_json(config, ConfigError, "config")
    return isinstance(raw, dict) and raw.get("model_type") == "llava"


def open_member(path: str | Path) -> Member:
    from engine.zoo.mllm import load_member

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model {path.name!r} has no config.json: not a model folder", path=path)
    if not is_llava_folder(path):
        raise ParameterError(f"model {path.name!r} is text-only (not a LLaVA multimodal model): "
                             "it has no vision encoder to fuse", path=path)
    model, view = load_member(path)
    return Member(path, model, view)


def read_base(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config, state dict)`` of the shared text LM."""
    from engine.io import ModelFolder

    path = Path(path)
    if is_llava_folder(path):
        raise ParameterError(f"base {path.name!r} is a multimodal model; give the text LM the "
                             "members were built on", path=path)
    with ModelFolder(path, check_finite=True) as folder:
        return dict(folder.config), {n: folder.get_tensor(n) for n in folder.tensor_names}


def check_member(member: Member, base_config: dict, base_state: dict[str, torch.Tensor],
                 base_path: Path) -> None:
    """Refuse a member whose LM is not the base's architecture and vocabulary."""
    name = member.path.name
    text = member.model.config.text_config
    if text.vocab_size != base_config.get("vocab_size"):
        raise ParameterError(f"model {name!r} has vocabulary size {text.vocab_size}, the base "
                             f"{base_path.name!r} {base_config.get('vocab_size')}: different "
                             "vocabularies", path=member.path)
    lm = member.lm_state
    missing, extra = sorted(set(base_state) - set(lm)), sorted(set(lm) - set(base_state))
    if missing or extra:
        raise ParameterError(f"model {name!r}: its language model has other tensors than the base "
                             f"{base_path.name!r} (missing {missing[:3]}, extra {extra[:3]}): "
                             "a different LM base", path=member.path)
    for key, tensor in base_state.items():
        if tuple(lm[key].shape) != tuple(tensor.shape):
            raise ParameterError(f"model {name!r}: {key} is {tuple(lm[key].shape)}, the base "
                                 f"{base_path.name!r} has {tuple(tensor.shape)}: a different "
                                 "LM base", path=member.path, tensor=key)


def check_tokenizers(members: list[Member], base_path: Path) -> None:
    """Every member ships the base's tokenizer files (the same vocabulary, token for token)."""
    from engine.io.side_files import read_side_file

    want = read_side_file(base_path, "tokenizer.json")
    for member in members:
        have = read_side_file(member.path, "tokenizer.json")
        if want is not None and have is not None and have != want:
            raise ParameterError(f"model {member.path.name!r} has another tokenizer than the base "
                                 f"{base_path.name!r}: different vocabularies", path=member.path)
