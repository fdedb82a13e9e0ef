"""Reused CPU buffers for the tensors a streaming job reads and writes.

A fresh ``torch.empty`` of tens of MB is fresh pages from the kernel: the first write into it
(the ``pread`` of a tensor, the merge writing its output) takes a page fault per 4 KiB, which
costs about twice the copy itself. A merge allocates the same few sizes over and over (one per
kind of layer), so the pool hands out buffers it made before once nothing uses them any more.

Whether a buffer is in use is read from its storage's reference count: the pool holds the
buffer and its storage object (2 references); any tensor made from it (the one handed out, its
views, anything holding them) adds one. A buffer is handed out again only when the count is
back at 2, so a tensor still referenced anywhere, by anyone, is never overwritten. Where torch
does not expose the count, nothing is pooled.

Small tensors (under ``MIN_POOLED`` bytes) come from the ordinary allocator. Idle buffers
beyond ``max_idle_bytes`` are released, oldest first, so a model of many different tensor
sizes does not accumulate one buffer of each.
"""

from __future__ import annotations

import math
import threading

import torch

MIN_POOLED = 1 << 20
_use_count = getattr(torch._C, "_storage_Use_Count", None)


class BufferPool:
    """``empty(shape, dtype)`` like ``torch.empty``, from reused storage where possible."""

    def __init__(self, max_idle_bytes: int = 1 << 30):
        self.max_idle_bytes = int(max_idle_bytes)
        self._buffers: list[tuple[int, torch.Tensor, torch.UntypedStorage]] = []  # nbytes, backing, storage
        self._lock = threading.Lock()
        self.reused = 0
        self.allocated = 0

    @staticmethod
    def _idle(storage: torch.UntypedStorage) -> bool:
        return _use_count(storage._cdata) == 2

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        shape = tuple(int(x) for x in shape)
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if nbytes < MIN_POOLED or _use_count is None:
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            for i, (size, backing, storage) in enumerate(self._buffers):
                if size == nbytes and self._idle(storage):
                    self._buffers.append(self._buffers.pop(i))  # most recently used last
                    self.reused += 1
                    return backing.view(dtype).view(shape)
            self._trim(nbytes)
            backing = torch.empty(nbytes, dtype=torch.uint8)
            self._buffers.append((nbytes, backing, backing.untyped_storage()))
            self.allocated += 1
            return backing.view(dtype).view(shape)

    def _trim(self, incoming: int) -> None:
        """Release idle buffers, least recently used first, while the idle ones plus the
        buffer about to be made exceed ``max_idle_bytes``."""
        idle = [i for i, (_, _, storage) in enumerate(self._buffers) if self._idle(storage)]
        total = sum(self._buffers[i][0] for i in idle) + incoming
        drop = set()
        for i in idle:
            if total <= self.max_idle_bytes:
                break
            drop.add(i)
            total -= self._buffers[i][0]
        if drop:
            self._buffers = [b for i, b in enumerate(self._buffers) if i not in drop]

    def clear(self) -> None:
        with self._lock:
            self._buffers.clear()


__all__ = ["BufferPool", "MIN_POOLED"]
