"""A LoRA adapter over its base, read as a fine-tuned model folder.

``AdapterFinetune(base, adapter)`` answers what the engine asks a ``ModelFolder`` (tensor names,
headers' shapes and dtypes, config, fingerprints, one tensor at a time), so analysis, merge,
compression and the what-if take an adapter wherever they take a fine-tune folder, with the
LoRA rule in one place (``LoraAdapter.delta``). A tensor is read as ``base + delta`` in float32,
one tensor at a time: no merged model is ever built in memory or on disk. Tensors the adapter
does not change are the base's own (a zero task vector).

``open_finetune(path, base)`` is the one way to open "a fine-tune": a model folder or an adapter
folder (mergekit's ``BASE+ADAPTER`` recipe reference is split by ``engine.recipe``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import torch

from engine.errors import ConfigError
from engine.io import ModelFolder, TensorInfo
from engine.lora.adapter import LoraAdapter, is_adapter_folder

WORK_DTYPE = torch.float32


class AdapterFinetune:
    """The fine-tuned model ``base + adapter``, read lazily tensor by tensor (see module doc)."""

    is_adapter = True

    def __init__(self, base: ModelFolder, adapter: LoraAdapter | str | Path):
        self.base = base
        self.adapter = adapter if isinstance(adapter, LoraAdapter) else LoraAdapter(adapter)
        self.path = self.adapter.path
        self.adapter.check_base({n: base.info(n).shape for n in base.tensor_names}, base.path)
        self._changed = set(self.adapter.targets)

    # ------------------------------------------------------------------ inventory (the base's)
    @property
    def config(self) -> dict:
        return self.base.config

    @property
    def tensor_names(self) -> list[str]:
        return self.base.tensor_names

    @property
    def headers(self):
        return {self.adapter.weights_path: self.adapter.header, **self.base.headers}

    @property
    def shard_files(self) -> list[Path]:
        return [self.adapter.weights_path]

    @property
    def num_parameters(self) -> int:
        return self.base.num_parameters

    @property
    def total_bytes(self) -> int:
        return self.base.total_bytes

    def info(self, name: str) -> TensorInfo:
        info = self.base.info(name)
        if name in self._changed:  # read as float32 (base + delta); the base's dtype is kept
            return TensorInfo(name, info.shape, info.dtype, self.adapter.weights_path, info.nbytes)
        return info

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def file_fingerprints(self) -> dict[str, dict]:
        """Per file, as ``ModelFolder`` keys them (the file a tensor's ``info`` names): the base's
        shards (tensors the adapter leaves alone) and the adapter's weights with its config's
        digest (the tensors it changes), so editing either is a different fine-tune."""
        return {**self.base.file_fingerprints(), **self.adapter.file_fingerprints()}

    # ------------------------------------------------------------------ tensors
    def read_tensor(self, name: str) -> torch.Tensor:
        """The fine-tuned tensor: the base's as stored where the adapter leaves it, else
        ``base + delta`` in float32."""
        base = self.base.read_tensor(name)
        if name not in self._changed:
            return base
        delta = self.adapter.delta(name, base)
        return delta.add_(base.to(WORK_DTYPE))

    get_tensor = read_tensor

    def delta(self, name: str, device: torch.device | str | None = None) -> torch.Tensor | None:
        """The task vector of ``name`` straight from the adapter (None: unchanged)."""
        if name not in self._changed:
            return None
        base = self.base.read_tensor(name) if name in self.adapter.whole else None
        return self.adapter.delta(name, base, device)

    def iter_tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for name in (self.tensor_names if names is None else names):
            yield name, self.read_tensor(name)

    def nonfinite_counts(self, names: Iterable[str] | None = None) -> dict[str, dict[str, int]]:
        counts = {}
        for name in (self.tensor_names if names is None else names):
            if not self.info(name).dtype.is_floating_point:
                continue
            tensor = self.read_tensor(name)
            nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
            if nan or inf:
                counts[name] = {"nan": nan, "inf": inf}
        return counts

    def close(self) -> None:
        self.adapter.close()

    def __enter__(self) -> "AdapterFinetune":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"AdapterFinetune({str(self.path)!r} over {str(self.base.path)!r})"


def open_finetune(path: str | Path, base: ModelFolder | None):
    """A fine-tune at ``path``: a ``ModelFolder``, or an ``AdapterFinetune`` over ``base`` when
    ``path`` is a PEFT adapter folder (which needs a base)."""
    if is_adapter_folder(path):
        if base is None:
            raise ConfigError("a LoRA adapter needs a base model (give --base, or base_model in "
                              "the recipe)", path=path)
        return AdapterFinetune(base, path)
    return ModelFolder(path)


def parameter_count(path: str | Path, base: str | Path | None = None) -> int:
    """Parameters of a model folder, or of an adapter's model (its base's; headers only)."""
    if is_adapter_folder(path):
        if base is None:
            raise ConfigError("a LoRA adapter needs a base model to count its parameters", path=path)
        path = base
    with ModelFolder(path) as folder:
        return folder.num_parameters


def largest_parameter_count(*paths: str | Path | None) -> int:
    """The largest parameter count among model folders (headers only); an adapter counts as
    its base, which is among the paths."""
    return max([parameter_count(p) for p in paths if p and not is_adapter_folder(p)], default=0)
