"""Tiny synthetic model folders and hand-crafted (possibly malformed) safetensors files."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from engine.io import ModelWriter

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "vocab_size": 12,
    "tie_word_embeddings": False,
}


def tiny_tensors(dtype: torch.dtype = torch.float32, *, seed: int = 0, hidden: int = 8, vocab: int = 12,
                 layers: int = 2, head: bool = True) -> dict[str, torch.Tensor]:
    """A Llama-shaped state dict in miniature (shapes only; no model needed)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    tensors = {"model.embed_tokens.weight": rnd(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors[p + "self_attn.q_proj.weight"] = rnd(hidden, hidden)
        tensors[p + "mlp.up_proj.weight"] = rnd(2 * hidden, hidden)
        tensors[p + "input_layernorm.weight"] = rnd(hidden)
    tensors["model.norm.weight"] = rnd(hidden)
    if head:
        tensors["lm_head.weight"] = rnd(vocab, hidden)
    return tensors


def write_model(folder: Path, tensors: dict[str, torch.Tensor], config: dict | None = None,
                **writer_kw) -> Path:
    with ModelWriter(folder, config=dict(TINY_CONFIG if config is None else config), **writer_kw) as w:
        for name, tensor in tensors.items():
            w.add_tensor(name, tensor)
    return folder


def safetensors_bytes(header: dict | bytes, data: bytes = b"", *, length: int | None = None) -> bytes:
    """Assemble a safetensors file by hand: 8-byte length, header JSON, data. ``length`` lies."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def f32_entry(begin: int, shape: list[int], dtype: str = "F32", itemsize: int = 4) -> dict:
    n = 1
    for d in shape:
        n *= d
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, begin + n * itemsize]}


def folder_with_file(folder: Path, payload: bytes, name: str = "model.safetensors",
                     config: dict | None = None) -> Path:
    """A model folder whose single weight file holds exactly ``payload``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG if config is None else config))
    (folder / name).write_bytes(payload)
    return folder


def snapshot(root: Path) -> list[str]:
    """Every path under root (relative), to prove an operation left no trace."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            out.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(out)


def staging_leftovers(parent: Path) -> list[str]:
    return [n for n in os.listdir(parent) if ".staging-" in n]


# ------------------------------------------------------------- corrupting a file being written
def buffered_twin(fd: int) -> int:
    """A second, buffered descriptor of the file behind ``fd`` (which may be the shard's
    ``O_DIRECT`` one, where an unaligned one-byte write is refused)."""
    return os.open(f"/proc/self/fd/{fd}", os.O_RDWR)


def flip_byte(fd: int, offset: int) -> None:
    """Invert the byte at ``offset`` of the file behind ``fd``, as another writer could."""
    twin = buffered_twin(fd)
    try:
        old = os.pread(twin, 1, offset)
        os.pwrite(twin, bytes([old[0] ^ 0xFF]), offset)
    finally:
        os.close(twin)


def first_data_byte(fd: int, offset: int, length: int) -> int | None:
    """The first byte of tensor data (not the header) among the ``length`` bytes just written
    at ``offset`` of the safetensors file behind ``fd``; None when they are all header."""
    twin = buffered_twin(fd)
    try:
        data_start = 8 + struct.unpack("<Q", os.pread(twin, 8, 0))[0]
    finally:
        os.close(twin)
    position = max(offset, data_start)
    return position if position < offset + length else None
