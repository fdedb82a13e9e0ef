"""engine.io.buffers: a buffer is handed out again only once nothing holds its storage."""

from __future__ import annotations

import torch

from engine.io.buffers import MIN_POOLED, BufferPool

SHAPE = (MIN_POOLED // 4,)  # float32: exactly MIN_POOLED bytes


def test_a_released_buffer_is_reused_and_a_held_one_never_is():
    pool = BufferPool()
    a = pool.empty(SHAPE, torch.float32)
    a.fill_(1.0)
    b = pool.empty(SHAPE, torch.float32)  # a is held: a new buffer
    assert a.data_ptr() != b.data_ptr()
    ptr = a.data_ptr()
    del a
    c = pool.empty((MIN_POOLED // 2,), torch.bfloat16)  # same bytes, another dtype and shape
    assert c.data_ptr() == ptr and c.dtype == torch.bfloat16 and c.shape == (MIN_POOLED // 2,)
    assert (pool.reused, pool.allocated) == (1, 2)


def test_views_and_numpy_arrays_keep_a_buffer_in_use():
    pool = BufferPool()
    a = pool.empty(SHAPE, torch.float32)
    ptr = a.data_ptr()
    view = a.reshape(-1)[10:]
    array = a.numpy()
    del a
    assert pool.empty(SHAPE, torch.float32).data_ptr() != ptr  # the view holds it
    del view
    assert pool.empty(SHAPE, torch.float32).data_ptr() != ptr  # the numpy array holds it
    del array
    assert pool.empty(SHAPE, torch.float32).data_ptr() == ptr


def test_small_tensors_are_not_pooled_and_idle_buffers_are_bounded():
    pool = BufferPool(max_idle_bytes=2 * MIN_POOLED)
    small = pool.empty((16,), torch.float32)
    assert small.shape == (16,) and pool.allocated == 0
    for k in range(1, 6):  # five different sizes, each released at once
        pool.empty((k * MIN_POOLED,), torch.uint8)
    idle = sum(size for size, _, _ in pool._buffers)
    assert idle <= 5 * MIN_POOLED + 2 * MIN_POOLED and len(pool._buffers) < 5
