"""The one bounded thread pool of the data path: file I/O, fsync, hashing, compression
and encryption all run here, so together they never use more than ``MAX_WORKERS``
threads, whatever the number of jobs and devices.

Neither asyncio's default executor nor anyio's worker threads are used: they are
shared with every library in the process and sized for nobody in particular (anyio's
default limiter lets 40 threads run at once). ``executor()`` creates the pool on first
use (importing this module starts nothing and configures nothing), and
``aiofiles.open(..., executor=executor())`` sends local file calls to it.

``MAX_WORKERS`` is the number of CPUs plus 4, at most 32 (the rule the standard
library's ``ThreadPoolExecutor`` uses by default): compression, encryption and hashing
are CPU work that releases the GIL, so one thread per core keeps every core busy, and
the 4 extra threads let fsync and file writes, which mostly wait for the disk, proceed
while all cores compress. More threads would only queue on the same cores and disk.

Only bounded work belongs here: a call that waits for another call in the pool, or for
a pipe, socket or lock held by someone else, could hold every thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import os
import threading
from collections.abc import Callable
from typing import Final, TypeVar

import anyio

__all__ = ("MAX_WORKERS", "executor", "run_sync")

MAX_WORKERS: Final = min(32, (os.cpu_count() or 1) + 4)

_T = TypeVar("_T")
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_limiter: anyio.CapacityLimiter | None = None


def executor() -> concurrent.futures.ThreadPoolExecutor:
    """The pool, created with ``MAX_WORKERS`` threads at the first call."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=MAX_WORKERS, thread_name_prefix="vdistream-io"
            )
        return _pool


async def run_sync(
    func: Callable[..., _T], *args: object, limiter: anyio.CapacityLimiter | None = None
) -> _T:
    """``func(*args)`` in the pool, in a copy of the caller's context (its log fields),
    holding a token of ``limiter`` (a per-job bound) if one is given.

    Cancellation: delivered while the call waits for a token (``limiter``'s, then one of
    the pool's ``MAX_WORKERS``: nothing waits inside the pool's own queue, where it
    could not be cancelled), and then nothing ran. Once submitted, the call is waited
    for even in a cancelled scope (shielded), because the thread may still be reading or
    writing a buffer the caller is about to hand back; the cancellation then arrives at
    the caller's next checkpoint. ``aiofiles`` calls use the same threads without these
    tokens: they are short file calls, so a token holder waits at most for one of them.
    """
    if limiter is not None:
        async with limiter:
            return await run_sync(func, *args)
    tokens, borrower = _tokens(), object()
    await tokens.acquire_on_behalf_of(borrower)
    try:
        # asyncio only, like aiofiles: the event loop waits on the pool's future
        future = executor().submit(contextvars.copy_context().run, func, *args)
        with anyio.CancelScope(shield=True):
            result = await asyncio.wrap_future(future)
    finally:
        tokens.release_on_behalf_of(borrower)
    return result


def _tokens() -> anyio.CapacityLimiter:
    """One token a pool thread, created in the first caller's event loop."""
    global _limiter
    if _limiter is None:
        _limiter = anyio.CapacityLimiter(MAX_WORKERS)
    return _limiter
