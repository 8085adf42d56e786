"""Recycled output buffers for the cpu backend.

A freshly allocated array of many megabytes is not free: the operating system maps its pages on
first touch and zeroes each one, which costs about one more pass over memory. For batch norm,
whose floor is 2 passes (eval) to 5 (backward), that is a 20-50 % slowdown. So large outputs
come from a pool of raw buffers that fastbn keeps, and a buffer is handed out again only when
nothing outside the pool refers to it any more: every array or view made from it holds a
reference to it (NumPy keeps the owner as ``base``), so CPython's reference count says exactly
when the last one is gone.

Small outputs use ``np.empty``: below a few megabytes the C allocator already reuses memory.

Releasing pooled memory: the pool keeps at most ``POOL.max_idle_bytes`` (1 GiB) of idle buffers.
``fastbn.backends.buffers.POOL.max_idle_bytes = 0`` frees every idle buffer at once and turns
pooling off (assign a positive limit to turn it back on); buffers still in use by arrays are
freed as soon as those arrays are.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import weakref

import numpy as np

MIN_POOLED_BYTES = 4 << 20
_POOLS: weakref.WeakSet = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for pool in _POOLS:
        pool._lock = threading.Lock()  # another thread may have held it at the fork


os.register_at_fork(after_in_child=_after_fork_in_child)


class BufferPool:
    """Raw byte buffers reused once unreferenced; at most ``max_idle_bytes`` kept while idle.

    Parameters
    ----------
    max_idle_bytes : int
        Idle buffers beyond this total are released (oldest first); 0 disables pooling.
        Assigning it releases at once the idle buffers beyond the new limit.
    """

    def __init__(self, max_idle_bytes: int = 1 << 30) -> None:
        self._buffers: list[np.ndarray] = []  # least recently handed out first
        self._lock = threading.Lock()
        self.max_idle_bytes = max_idle_bytes
        _POOLS.add(self)

    @property
    def max_idle_bytes(self) -> int:
        """Most bytes kept in idle buffers; assigning trims the pool to it at once."""
        return self._max_idle_bytes

    @max_idle_bytes.setter
    def max_idle_bytes(self, limit: int) -> None:
        limit = int(limit)
        if limit < 0:
            raise ValueError(f"max_idle_bytes must be >= 0, got {limit}")
        with self._lock:
            self._max_idle_bytes = limit
            self._release_idle(keep_bytes=limit)

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An uninitialized C-contiguous array, like ``np.empty(shape, dtype)``."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < MIN_POOLED_BYTES or self.max_idle_bytes <= 0:
            return np.empty(shape, dtype)
        with self._lock:
            index = next((i for i in range(len(self._buffers))
                          if self._buffers[i].nbytes == nbytes and self._idle(i)), None)
            if index is None:
                self._release_idle(keep_bytes=self.max_idle_bytes - nbytes)
                self._buffers.append(np.empty(nbytes, np.uint8))
            else:
                self._buffers.append(self._buffers.pop(index))
            return self._buffers[-1].view(dtype).reshape(shape)

    def empty_like(self, a: np.ndarray) -> np.ndarray:
        """``empty(a.shape, a.dtype)``: an output like ``a`` (small ones go straight to
        ``np.empty``, without the 0.5 us of computing their size)."""
        if a.nbytes < MIN_POOLED_BYTES:
            return np.empty(a.shape, a.dtype)
        return self.empty(a.shape, a.dtype)

    def idle_bytes(self) -> int:
        """Bytes held in buffers that no array uses."""
        with self._lock:
            return sum(self._buffers[i].nbytes for i in range(len(self._buffers))
                       if self._idle(i))

    def _idle(self, index: int) -> bool:
        # Only the pool's list and getrefcount's argument refer to an idle buffer; every
        # array made from it holds one more reference. (No local name may hold it here.)
        return sys.getrefcount(self._buffers[index]) == 2

    def _release_idle(self, keep_bytes: int) -> None:
        idle = [i for i in range(len(self._buffers)) if self._idle(i)]
        idle_bytes = sum(self._buffers[i].nbytes for i in idle)
        dropped = set()
        for i in idle:  # oldest first
            if idle_bytes <= keep_bytes:
                break
            idle_bytes -= self._buffers[i].nbytes
            dropped.add(i)
        self._buffers = [b for i, b in enumerate(self._buffers) if i not in dropped]


#: The pool the cpu backend allocates its outputs from.
POOL = BufferPool()
