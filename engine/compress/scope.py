"""What a compression compresses (``scope``) and what its target ratio is measured over
(``ratio_over``): pipeline options every method's parameters carry (``CompressParams``).

``scope: all`` (the default): every matrix goes to the compressor, embeddings and LM head
included; 1-D tensors (norms, biases) are stored exactly as fp16 deltas.

``scope: blocks``: what the delta-compression papers do (BitDelta compresses the blocks'
attention and MLP projections; Delta-DCT, Delta-CoMe and ImPart likewise quote their ratios
over the blocks' linear layers): only the matrices inside the transformer blocks (a block
index in the name, ``engine.tensor_names``) are compressed. Everything else (embeddings, LM
head, norms, biases) is *kept*: its delta is stored in fp16 (2 bytes an entry, the rebuilt
tensor is ``base + fp16(delta)``), a kept matrix as a raw little-endian fp16 section. The
papers keep these at the model's own precision; an fp16 *delta* is that for bf16/fp16 models
and far closer than fp16 of the weights for float32 ones (a norm weight near 1 rounds by
~5e-4 in fp16, the size of a typical norm delta). Kept bytes still count on disk.

Ratios: ``ratio`` (on disk) = 2 bytes x every delta entry / bytes of the whole artifact
folder, our honest figure; ``ratio over the compressed set`` = 2 bytes x the compressed
matrices' entries / bytes of their sections (the papers' convention: no manifest, no kept
tensors, no 1-D deltas). ``ratio_over: artifact`` (default) aims the target at the first,
``compressed`` at the second; both are reported either way. With ``scope: blocks`` on small
models the kept tensors alone can exceed a high on-disk target (the full zoo's embeddings and
head are 4-7% of its entries, a ceiling of 14-25x on disk; the quick zoo's 9-17%):
``ratio_over: compressed`` then gives the papers' setting, with the on-disk ratio beside it.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.errors import ArtifactError
from engine.tensor_names import layer_index_of


def scope_of(params) -> str:
    return getattr(params, "scope", "all")


def in_scope(name: str, shape: tuple[int, ...], scope: str) -> bool:
    """Is this matrix given to the compressor? (1-D tensors never are.)"""
    if scope == "all":
        return True
    if scope == "blocks":
        return layer_index_of(name) is not None
    raise ValueError(f"unknown scope {scope!r}")


def exact_section(delta: torch.Tensor) -> bytes:
    """A kept matrix's section: its delta in little-endian fp16, row-major. ValueError when
    a value overflows fp16 (the caller names the tensor)."""
    with np.errstate(over="ignore"):  # an overflow is the Inf checked below
        half = delta.detach().to("cpu", torch.float32).reshape(-1).numpy().astype("<f2")
    if not np.isfinite(half).all():
        raise ValueError("the delta overflows float16")
    return half.tobytes()


def exact_delta(data: bytes, shape, name: str, device) -> torch.Tensor:
    """The float32 delta of a kept matrix's section (the inverse of ``exact_section``)."""
    numel = int(np.prod(shape))
    if len(data) != 2 * numel:
        raise ArtifactError(f"section of {name!r} (stored in fp16, outside the compression "
                            f"scope) has {len(data)} bytes, expected {2 * numel}")
    values = np.frombuffer(data, dtype="<f2").astype(np.float32)
    return torch.from_numpy(values).reshape(tuple(shape)).to(device)


def manifest_entry(kept_sections: list[int], compressed_entries: int) -> dict:
    return {"kept_sections": list(kept_sections), "compressed_entries": int(compressed_entries)}


def compressed_set_ratio(offsets, manifest: dict) -> float | None:
    """2 bytes x the compressed matrices' entries / their sections' bytes, from an artifact's
    section offsets and manifest; None for an artifact written before the scope entry, or
    when nothing was stored for the compressed set."""
    entry = manifest.get("scope")
    if not isinstance(entry, dict):
        return None
    offsets = [int(o) for o in offsets]
    kept = set(entry.get("kept_sections") or [])
    stored = sum(offsets[i + 1] - offsets[i] for i in range(len(offsets) - 1) if i not in kept)
    entries = entry.get("compressed_entries") or 0
    return 2.0 * entries / stored if stored > 0 and entries > 0 else None


def artifact_summary(artifact_path) -> dict:
    """``{"on_disk", "compressed_set", "scope", "warnings"}`` of an artifact folder (for the
    pages: both ratios, and the warning a calibration fallback left in the manifest)."""
    from engine.compress.artifact import Artifact

    artifact = Artifact(artifact_path, verify=False)
    warning = artifact.manifest.get("calibration_warning")
    return {"on_disk": artifact.ratio,
            "compressed_set": compressed_set_ratio(artifact.offsets, artifact.manifest),
            "scope": artifact.params.get("scope", "all"),
            "warnings": [warning] if isinstance(warning, str) else []}
