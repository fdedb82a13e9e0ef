"""Serve many fine-tunes from one base: keep the base once and every delta compressed.

``DeltaServer(base_dir)`` loads the base's tensors once (float32, or ``dtype``); ``add(name,
artifact)`` checks the artifact against that base and keeps its compressed bytes in memory
(payload, fp16 vectors, manifest: a few percent of a model); ``materialize(name)`` rebuilds the
fine-tune on demand, tensor by tensor, either as a new state dict or written in place into a
model you pass (its parameters are overwritten, so switching fine-tunes allocates nothing
model-sized). ``memory()`` reports what is held.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.compress.codec import decode_section, is_matrix, rebuild_tensor
from engine.compress.rebuild import open_checked
from engine.compress.registry import CompressMethod
from engine.device import resolve_device
from engine.errors import ParameterError
from engine.io import ModelFolder


@dataclass
class _Loaded:
    method: CompressMethod
    params: object
    payload: bytes
    offsets: np.ndarray
    vectors: np.ndarray
    artifact_bytes: int

    @property
    def held_bytes(self) -> int:
        return len(self.payload) + self.offsets.nbytes + 2 * self.vectors.size


class DeltaServer:
    """One base in memory, many compressed fine-tunes, any of them rebuilt on demand."""

    def __init__(self, base_dir: str | Path, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32, verify: bool = True):
        self.device = resolve_device(device)
        self.dtype = dtype
        self.verify = verify
        self.folder = ModelFolder(base_dir)
        self.names = list(self.folder.tensor_names)
        self.shapes = {n: tuple(self.folder.info(n).shape) for n in self.names}
        # integer and bool tensors keep their dtype: they are served as the base's copy
        self.base = {n: t.to(self.device, dtype) if t.is_floating_point() else t.to(self.device)
                     for n, t in ((n, self.folder.get_tensor(n)) for n in self.names)}
        self._deltas: dict[str, _Loaded] = {}
        self.last_switch_s: float | None = None

    # ------------------------------------------------------------ registry of fine-tunes
    def add(self, name: str, artifact_dir: str | Path) -> "DeltaServer":
        """Check ``artifact_dir`` against the base and keep its compressed bytes."""
        artifact, spec, params = open_checked(artifact_dir, self.folder, verify=self.verify)
        self._deltas[name] = _Loaded(
            method=spec, params=params, payload=artifact.payload(), offsets=artifact.offsets.copy(),
            vectors=artifact.vectors().astype(np.float16), artifact_bytes=artifact.total_bytes)
        return self

    def remove(self, name: str) -> None:
        self._deltas.pop(name, None)

    @property
    def fine_tunes(self) -> list[str]:
        return list(self._deltas)

    # ------------------------------------------------------------ rebuild
    def iter_tensors(self, name: str):
        """(tensor name, rebuilt tensor in the server's dtype), one at a time."""
        try:
            loaded = self._deltas[name]
        except KeyError:
            raise ParameterError(f"no fine-tune named {name!r}; loaded: {', '.join(self._deltas) or 'none'}") from None
        index, cursor = 0, 0
        for tensor_name in self.names:
            shape = self.shapes[tensor_name]
            base_t = self.base[tensor_name]
            if not base_t.is_floating_point():  # no delta is stored for it (see compress)
                if is_matrix(shape):
                    index += 1
                else:
                    cursor += int(np.prod(shape))
                yield tensor_name, base_t
                continue
            if is_matrix(shape):
                begin, end = int(loaded.offsets[index]), int(loaded.offsets[index + 1])
                d_hat = decode_section(loaded.method, loaded.params, loaded.payload[begin:end],
                                       tensor_name, shape, index, self.device)
                out = rebuild_tensor(loaded.method, loaded.params, base_t, d_hat, tensor_name, index, self.device)
                index += 1
            else:
                count = int(np.prod(shape))
                d = torch.from_numpy(loaded.vectors[cursor:cursor + count].astype(np.float32)).reshape(shape)
                cursor += count
                out = base_t.to(torch.float32) + d.to(self.device)
            yield tensor_name, out.to(self.dtype)

    @torch.no_grad()
    def materialize(self, name: str, into: torch.nn.Module | None = None):
        """The fine-tune ``name`` as a state dict, or written in place into ``into``'s
        parameters (returns ``into``). The switch time is kept in ``last_switch_s``."""
        started = time.perf_counter()
        if into is None:
            out = dict(self.iter_tensors(name))
        else:
            targets = dict(into.named_parameters())
            targets.update(dict(into.named_buffers()))
            missing = [n for n in self.names if n not in targets]
            if missing:
                raise ParameterError(f"the model lacks tensors of the base: {missing[:3]}")
            for tensor_name, tensor in self.iter_tensors(name):
                targets[tensor_name].copy_(tensor)
            out = into
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.last_switch_s = time.perf_counter() - started
        return out

    # ------------------------------------------------------------ accounting
    def memory(self) -> dict:
        base_bytes = sum(t.numel() * t.element_size() for t in self.base.values())
        deltas = {n: d.held_bytes for n, d in self._deltas.items()}
        return {"base_bytes": base_bytes, "delta_bytes": deltas,
                "total_bytes": base_bytes + sum(deltas.values())}

    def close(self) -> None:
        self.folder.close()
