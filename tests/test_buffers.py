"""The cpu backend's recycled output buffers: reused only once nothing refers to them."""

import threading

import numpy as np
import pytest

import fastbn
from fastbn.backends.buffers import MIN_POOLED_BYTES, BufferPool

N = MIN_POOLED_BYTES // 4  # float32 elements in the smallest pooled buffer


def test_buffer_is_reused_only_after_every_view_is_gone():
    pool = BufferPool()
    a = pool.empty((N,), np.float32)
    address = a.ctypes.data
    view = a.reshape(2, -1)[1]
    del a
    b = pool.empty((N,), np.float32)
    assert b.ctypes.data != address  # a view still holds the first buffer
    del view
    c = pool.empty((N // 2, 2), np.float32)
    assert c.ctypes.data == address and c.shape == (N // 2, 2)
    assert b.ctypes.data != c.ctypes.data


def test_small_arrays_are_not_pooled():
    pool = BufferPool()
    pool.empty((10, 10), np.float64)
    assert pool._buffers == []


def test_empty_like_pools_only_large_outputs():
    pool = BufferPool()
    small = pool.empty_like(np.zeros((3, 10, 1), np.float16))
    assert small.shape == (3, 10, 1) and small.dtype == np.float16 and pool._buffers == []
    large = pool.empty_like(np.zeros((2, N // 2, 1), np.float32))
    assert large.shape == (2, N // 2, 1) and large.dtype == np.float32
    assert large.flags.c_contiguous and len(pool._buffers) == 1


def test_idle_buffers_beyond_the_limit_are_released():
    pool = BufferPool(max_idle_bytes=3 * MIN_POOLED_BYTES)
    arrays = [pool.empty((N,), np.float32) for _ in range(3)]
    del arrays
    assert pool.idle_bytes() == 3 * MIN_POOLED_BYTES
    keep = pool.empty((2 * N,), np.float32)  # needs room for 2 more: two idle ones go
    assert pool.idle_bytes() == MIN_POOLED_BYTES
    assert len(pool._buffers) == 2
    del keep
    assert BufferPool(max_idle_bytes=0).empty((N,), np.float32).base is None  # disabled


def test_threads_never_share_a_live_buffer():
    pool = BufferPool()
    seen = []
    lock = threading.Lock()

    def work(value):
        for _ in range(50):
            a = pool.empty((N,), np.float32)
            a.fill(value)
            with lock:
                seen.append(bool(np.all(a == value)))

    threads = [threading.Thread(target=work, args=(v,)) for v in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(seen) and len(seen) == 200


def test_cpu_outputs_held_by_the_caller_are_never_overwritten():
    rng = np.random.default_rng(0)
    x1 = rng.standard_normal((64, 8, 64, 64)).astype(np.float32)  # 8 MiB: pooled
    x2 = rng.standard_normal(x1.shape).astype(np.float32)
    y1, _, _ = fastbn.batch_norm_forward(x1, backend="cpu")
    kept = y1.copy()
    y2, _, _ = fastbn.batch_norm_forward(x2, backend="cpu")
    assert y2.ctypes.data != y1.ctypes.data
    np.testing.assert_array_equal(y1, kept)
    address = y1.ctypes.data
    del y1
    y3, _, _ = fastbn.batch_norm_forward(x1, backend="cpu")
    assert y3.ctypes.data == address  # recycled once released
    np.testing.assert_array_equal(y3, kept)


def test_lowering_the_limit_releases_idle_buffers_at_once():
    pool = BufferPool()
    arrays = [pool.empty((N,), np.float32) for _ in range(3)]
    kept = arrays.pop()
    del arrays
    assert pool.idle_bytes() == 2 * MIN_POOLED_BYTES
    pool.max_idle_bytes = MIN_POOLED_BYTES
    assert pool.idle_bytes() == MIN_POOLED_BYTES and len(pool._buffers) == 2
    pool.max_idle_bytes = 0
    assert pool.idle_bytes() == 0 and len(pool._buffers) == 1  # the one in use stays
    kept[:] = 1.0
    assert pool.empty((N,), np.float32).base is None  # pooling is off at 0
    pool.max_idle_bytes = 1 << 30
    assert pool.max_idle_bytes == 1 << 30


def test_a_negative_limit_is_refused():
    with pytest.raises(ValueError, match="max_idle_bytes"):
        BufferPool().max_idle_bytes = -1
