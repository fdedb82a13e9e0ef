"""The one way in for model tensors: analysis, merge, compression and the what-if read here.

Three rules live in this file and nowhere else:

* **Tied head.** A model with tied embeddings stores no output head; asked for the head, it
  answers with its embedding matrix (``stored_name``).
* **Float32 deltas.** A task vector is ``finetune - base`` computed in float32: bf16 - bf16 in
  bf16 cancels most of a small fine-tuning update (its ulp at 1.0 is 2^-7).
* **LoRA.** A fine-tune may be a PEFT adapter over the base (``AdapterFinetune``); its task
  vector comes straight from the adapter's factors (``scale * B @ A``, or the saved module
  minus the base), never as ``(base + delta) - base``, which would round the update twice.

Reads go through ``read_tensor`` (plain ``pread`` into memory of our own, no memory map) where
the folder has it. Non-finite values are each caller's policy (analysis counts them, merge and
compression refuse them) through ``check_finite``.
"""

from __future__ import annotations

import torch

from engine.compat import embed_head_names, is_tied
from engine.errors import ConfigError, NonFiniteError

WORK_DTYPE = torch.float32


def stored_name(folder, name: str) -> str | None:
    """The name to read from ``folder`` for the tensor ``name``: itself, the embedding for the
    head of a tied model that stores none, or None when the folder has neither."""
    if name in folder:
        return name
    embed, head = embed_head_names(folder)
    if name == head and embed is not None and is_tied(folder):
        return embed
    return None


def read_stored(folder, name: str) -> torch.Tensor:
    """One tensor exactly as stored (a shared buffer: never modify it in place)."""
    reader = getattr(folder, "read_tensor", None)
    return reader(name) if reader is not None else folder.get_tensor(name)


def read_model_tensor(folder, name: str) -> torch.Tensor:
    """The model's tensor ``name`` as stored, a tied head read from the embedding."""
    source = stored_name(folder, name)
    if source is None:  # layouts are checked before any read; this is a safety net
        raise ConfigError("tensor missing", path=folder.path, tensor=name)
    return read_stored(folder, source)


def check_finite(tensor: torch.Tensor, folder, name: str, refused: str) -> None:
    """Refuse NaN/Inf in ``tensor`` (read from ``folder``) as ``NonFiniteError`` naming both;
    ``refused`` says what is refused ("compression refused", ...)."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise NonFiniteError(f"{bad} NaN/Inf value(s) (or beyond float32's range); {refused}",
                             path=folder.path, tensor=name)


def task_vector32(base32: torch.Tensor, finetune, name: str, *, source: str | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """``finetune - base`` of one tensor in float32 on ``base32``'s device (or ``device``).

    ``base32`` is the base's tensor already in float32 (read once for every fine-tune);
    ``source`` is the name read from the fine-tune (``stored_name``'s answer, e.g. a tied
    head's embedding). An adapter answers from its factors: exact, and the base is not read
    twice; a tensor the adapter leaves alone has a zero task vector."""
    device = torch.device(device) if device is not None else base32.device
    adapter_delta = getattr(finetune, "delta", None)
    if getattr(finetune, "is_adapter", False) and adapter_delta is not None:
        delta = adapter_delta(source or name, device)
        if delta is None:
            return torch.zeros_like(base32, device=device)
        return delta.to(device=device, dtype=WORK_DTYPE)
    stored = read_stored(finetune, source or name)
    tuned = stored.to(device=device, dtype=WORK_DTYPE)
    # in place only on our own copy: a tensor from the reader may share its storage
    own_copy = tuned.data_ptr() != stored.data_ptr()
    return tuned.sub_(base32) if own_copy else tuned - base32
