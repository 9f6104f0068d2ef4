"""Reused pinned host buffers for calibration activations offloaded from a GPU.

When a block's activations do not fit on the GPU, the engine copies every block's inputs and
outputs (and the frozen sub-module outputs it replays) to page-locked host memory, so the copies
back can overlap compute. Page-locked memory is expensive to allocate (the driver maps and locks
the pages), and torch's caching host allocator, which recycles it, rounds each block up to a power
of two (a [8, 2048, 4096] bf16 batch of 128 MiB is exact, an [8, 2048, 5120] one of 160 MiB takes
256 MiB). Every pass offloads tensors of the same few shapes, and each pass's tensors are dropped
before the next pass's are made, so a pool of exact-size buffers, each handed out again as soon
as nothing refers to it any more, needs about one block's worth of pinned memory and no new
allocation after the first pass.

A buffer is free when nothing but the pool refers to its storage (the caller's tensor and any
view of it are gone). Reusing it for a new device-to-host copy is safe while an earlier
host-to-device copy from it may still be in flight: both are queued on the current stream, which
runs them in order.

`pinned_pool()` opens a pool for the duration of a `with` block (quantize_model wraps the engine
run in one); `quant.engine._to_home` takes its buffers from the open pool, or allocates as before
when none is open. Nothing outlives the block: the pool's buffers go back to torch on exit.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

_ACTIVE: contextvars.ContextVar[PinnedPool | None] = contextvars.ContextVar("quantshift_pinned_pool", default=None)


def _storage_users(t: torch.Tensor) -> int | None:
    """How many tensors (and storage handles) share t's storage, or None when torch cannot say."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return None
    storage = t.untyped_storage()  # itself a handle for the duration of this call
    return int(count(storage._cdata)) - 1


class PinnedPool:
    """Exact-size host buffers (pinned when `pin`), handed out again once unreferenced."""

    def __init__(self, pin: bool = True) -> None:
        self.pin = pin
        self._buffers: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = {}
        self.allocated = 0  # buffers made
        self.reused = 0  # copies served by a buffer made earlier
        self.bytes = 0  # host bytes the pool holds

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        """A host copy of `t` in a pool buffer (a view of it: the pool keeps the buffer itself)."""
        buf = self._take(tuple(t.shape), t.dtype)
        buf.copy_(t)
        return buf.view(buf.shape)

    def _take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        bufs = self._buffers.setdefault((shape, dtype), [])
        for b in bufs:
            if _storage_users(b) == 1:  # only the pool's own tensor
                self.reused += 1
                return b
        b = torch.empty(shape, dtype=dtype, pin_memory=self.pin)
        if _storage_users(b) is not None:  # without the count, never reuse: nothing to keep
            bufs.append(b)
            self.bytes += b.numel() * b.element_size()
        self.allocated += 1
        return b

    def clear(self) -> None:
        self._buffers.clear()
        self.bytes = 0


@contextlib.contextmanager
def pinned_pool(pin: bool | None = None) -> Iterator[PinnedPool]:
    """Open a pool for this block (pinned when CUDA is available, unless `pin` says otherwise)."""
    pool = PinnedPool(torch.cuda.is_available() if pin is None else pin)
    token = _ACTIVE.set(pool)
    try:
        yield pool
    finally:
        _ACTIVE.reset(token)
        pool.clear()


def active_pool() -> PinnedPool | None:
    """The pool the innermost open `pinned_pool()` block made, if any."""
    return _ACTIVE.get()
