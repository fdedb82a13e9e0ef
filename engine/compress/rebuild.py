"""Rebuild a fine-tune from its artifact and base: checked, streamed tensor by tensor.

``decompress`` checks the base against the artifact's fingerprint (tensor layout, file sizes,
then the weight files' sha256) and writes a Hugging Face folder with ``ModelWriter``.

``iter_rebuilt`` yields the rebuilt tensors one at a time (serving, reports, the what-if);
``rebuild_state_dict`` holds them all (small models).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from pydantic import BaseModel

from engine.compress.artifact import Artifact, check_base, layout_of
from engine.compress.codec import decode_section, is_matrix, rebuild_tensor, stored_dtype
from engine.compress.encode import Progress
from engine.compress.registry import CompressMethod, get_method
from engine.compress.scope import in_scope, scope_of
from engine.device import resolve_device
from engine.errors import ArtifactError, NonFiniteError, ParameterError
from engine.io import ModelFolder, ModelWriter


def open_checked(artifact_path, base: ModelFolder, *, verify: bool = True) -> tuple[Artifact, CompressMethod, BaseModel]:
    artifact = Artifact(artifact_path, verify=verify)
    spec = get_method(artifact.method)
    try:
        params = spec.params_class.model_validate(artifact.params)
        if hasattr(params, "inner_parsed"):
            params.inner_parsed()
    except (ValueError, ParameterError) as err:
        raise ArtifactError(f"manifest parameters are invalid: {err}", path=artifact.path) from None
    check_base(artifact, base, verify_content=verify)
    entry = artifact.manifest.get("scope")
    if isinstance(entry, dict):  # the sections kept in fp16 are the ones the rule names
        matrices = [(n, s) for n, s in layout_of(base) if is_matrix(s)]
        expected = [i for i, (n, s) in enumerate(matrices) if not in_scope(n, s, scope_of(params))]
        if entry.get("kept_sections") != expected:
            raise ArtifactError(f"manifest scope lists the fp16 sections {entry.get('kept_sections')}, "
                                f"scope {scope_of(params)!r} names {expected}", path=artifact.path)
    return artifact, spec, params


def iter_rebuilt(artifact: Artifact, spec: CompressMethod, params, base: ModelFolder,
                 device=None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, rebuilt fine-tune tensor in float32 (float64 for a float64 base tensor) on
    ``device``), tensor by tensor; an integer or bool tensor is the base's, exactly."""
    device = resolve_device(device)
    vectors = artifact.vectors()
    cursor, index = 0, 0
    for name in base.tensor_names:
        shape = tuple(base.info(name).shape)
        base_t = base.get_tensor(name)
        if not base_t.is_floating_point():  # stored as a zero delta; never through float32
            if is_matrix(shape):
                index += 1
            else:
                cursor += int(np.prod(shape))
            yield name, base_t.to(device)
        elif is_matrix(shape):
            d_hat = decode_section(spec, params, artifact.section(index), name, shape, index, device)
            yield name, rebuild_tensor(spec, params, base_t, d_hat, name, index, device)
            index += 1
        else:
            count = int(np.prod(shape))
            d = torch.from_numpy(vectors[cursor:cursor + count].copy()).reshape(shape)
            cursor += count
            yield name, base_t.to(device, torch.promote_types(base_t.dtype, torch.float32)) + d.to(device)


def _cast_checked(tensor: torch.Tensor, dtype: torch.dtype | None, artifact: Artifact,
                  name: str) -> torch.Tensor:
    """A rebuilt tensor in the dtype it is written or handed out in, checked after the cast: a
    rebuilt value beyond float16's range is Inf there, and a corrupt section can decode to NaN.
    Integer and bool tensors (the base's copies) keep their dtype."""
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise NonFiniteError(f"{bad} rebuilt value(s) are NaN/Inf in "
                             f"{str(tensor.dtype).removeprefix('torch.')} (beyond its range); refused",
                             path=artifact.path, tensor=name)
    return tensor


@dataclass
class DecompressResult:
    out: Path
    method: str
    tensors: int
    seconds: float


def decompress(artifact_path: str | Path, base_path: str | Path, out: str | Path, *,
               device: torch.device | str | None = None, verify: bool = True,
               progress: Progress | None = None) -> DecompressResult:
    """Rebuild the fine-tune as a Hugging Face folder (config and tokenizer files included),
    with its model card (README.md)."""
    from engine.export_card import CARD_NAME, rebuild_card

    started = time.perf_counter()
    base = ModelFolder(base_path)
    try:
        artifact, spec, params = open_checked(artifact_path, base, verify=verify)
        extra = artifact.side_file_bytes(base.path)
        try:
            config = json.loads(extra.pop("config.json", b"null"))
        except ValueError:
            raise ArtifactError("config.json in the artifact is not JSON", path=artifact.path) from None
        if not isinstance(config, dict):
            raise ArtifactError("the artifact carries no config.json", path=artifact.path)
        manifest_extra = {"kind": "decompressed", "compression": {
            "method": spec.name, "params": artifact.params, "target_ratio": artifact.manifest.get("target_ratio"),
            "artifact_bytes": artifact.total_bytes}}
        # the card is ours: nothing from the artifact or the base is written under its name
        extra[CARD_NAME] = rebuild_card(method=spec.name, params=params.model_dump(mode="json"),
                                        base=base.path, artifact=artifact.path,
                                        target_ratio=artifact.manifest.get("target_ratio"),
                                        artifact_bytes=artifact.total_bytes).encode()
        names = base.tensor_names
        with ModelWriter(out, config=config, extra_files=extra, manifest_extra=manifest_extra,
                         input_folders=[base.path, artifact.path]) as writer:
            for i, (name, tensor) in enumerate(iter_rebuilt(artifact, spec, params, base, device)):
                writer.add_tensor(name, _cast_checked(tensor, stored_dtype(artifact.manifest, name),
                                                      artifact, name))
                if progress is not None:
                    progress((i + 1) / len(names), name)
    finally:
        base.close()
    return DecompressResult(out=Path(out), method=spec.name, tensors=len(names),
                            seconds=time.perf_counter() - started)


def rebuild_state_dict(artifact_path, base_path, *, device=None, verify: bool = True,
                       dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
    """The rebuilt fine-tune as an in-memory state dict (for evaluation without writing)."""
    base = ModelFolder(base_path)
    try:
        artifact, spec, params = open_checked(artifact_path, base, verify=verify)
        return {name: _cast_checked(t, dtype, artifact, name).cpu()
                for name, t in iter_rebuilt(artifact, spec, params, base, device)}
    finally:
        base.close()
