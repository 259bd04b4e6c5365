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

The pool's threads run at a lower scheduling priority than the rest of the process
(``WORKER_NICENESS`` above it, Linux's per-thread nice value): with more devices
compressing than there are cores, the event loop, which hands every buffer to them,
would otherwise get only its equal share of a core and the devices would wait for it
(measured: lz4 over 4 devices on 2 cores, the loop's CRC-32 of each MiB took 435 µs
instead of 60). The workers still use every core the loop leaves idle; the database
the backup reads from, at the default priority, comes first too.

``Writeback`` is the blocking helper that the file writers of the data path (the file
sink, the restore's file consumer) call in these threads after each write of a file
written front to back: streaming writeback with ``sync_file_range`` and
``posix_fadvise(DONTNEED)`` (see its docstring). It lives here, as ``fsync_directory``
does, because both storage and engines may use this module and nothing else they share.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import errno
import functools
import os
import threading
from collections.abc import Callable
from typing import Final, TypeVar

import anyio

__all__ = (
    "MAX_WORKERS",
    "WORKER_NICENESS",
    "WRITEBACK_WINDOW",
    "Writeback",
    "drop_cached",
    "executor",
    "fsync_directory",
    "run_sync",
)

MAX_WORKERS: Final = min(32, (os.cpu_count() or 1) + 4)
#: how much lower the pool threads' priority is (nice value) than their creator's
WORKER_NICENESS: Final = 5

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
                max_workers=MAX_WORKERS,
                thread_name_prefix="vdistream-io",
                initializer=_lower_priority,
            )
        return _pool


def _lower_priority() -> None:
    """In each new pool thread: nice it ``WORKER_NICENESS`` above its creator (best
    effort: where threads have no nice value of their own, nothing changes)."""
    try:
        thread = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(19, current + WORKER_NICENESS))
    except (OSError, AttributeError):
        pass


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
        # The pool's work item keeps what it was given until its thread gets round to
        # dropping it, which may be after the caller resumed: a view of the set's
        # buffer area would then still pin it (mmap.close() fails). So the thread gets
        # a box it empties before it calls, and nothing of the caller's stays referenced.
        box: list[tuple[Callable[..., _T], tuple[object, ...]]] = [(func, args)]

        def call() -> _T:
            function, arguments = box.pop()
            return function(*arguments)

        # asyncio only, like aiofiles: the event loop waits on the pool's future
        future = executor().submit(contextvars.copy_context().run, call)
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


def fsync_directory(path: str | bytes | os.PathLike[str]) -> None:
    """Make the names in directory ``path`` durable: a rename, link or removal in it
    (blocking; the one copy storage and engines share)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: bytes written between two ``sync_file_range`` calls of a ``Writeback``
WRITEBACK_WINDOW: Final = 8 << 20

# <linux/fs.h>
_SYNC_FILE_RANGE_WAIT_BEFORE: Final = 1
_SYNC_FILE_RANGE_WRITE: Final = 2
_SYNC_FILE_RANGE_WAIT_AFTER: Final = 4
#: errors that mean "this file or kernel cannot do it": the helper turns itself off
_UNSUPPORTED: Final = frozenset({errno.ENOSYS, errno.EINVAL, errno.ESPIPE, errno.EOPNOTSUPP})


@functools.cache
def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range``, looked up at the first ``Writeback`` (not at import:
    ctypes costs every command's start-up a little), or None where there is none."""
    import ctypes  # lazily, see above

    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux (or no such symbol in this libc)
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int

    def call(fd: int, offset: int, count: int, flags: int) -> int:
        """0, or the errno of the failure."""
        if function(fd, offset, count, flags) == 0:
            return 0
        return ctypes.get_errno() or errno.EIO

    return call


class Writeback:
    """Streaming writeback of a file written front to back, in worker threads.

    A writer calls ``wrote(end)`` (blocking) after its data up to byte ``end`` reached
    the page cache. Each time another ``window`` of bytes is complete, its writeback
    starts (``sync_file_range(WRITE)``, which does not wait), and the window before it
    is waited for and, with ``drop``, dropped from the page cache
    (``posix_fadvise(DONTNEED)``). So the disk writes while the stream is produced, the
    final ``fsync`` only has the last two windows left, dirty pages never pile up into
    one long stall, and a backup of N GiB leaves about ``2 x window`` of its pages in
    the page cache instead of evicting N GiB of someone else's (the database's).

    It is an optimisation only, never a durability promise (``fsync`` still is): on a
    kernel or file that cannot do it (not Linux, a pipe) it turns itself off. An I/O
    error seen while waiting is raised as ``OSError``, as ``write`` would raise it.
    A writer that seeks back simply stops calling ``wrote`` (``Writeback`` only looks
    at the furthest end it was told of).
    """

    def __init__(self, fd: int, *, window: int = WRITEBACK_WINDOW, drop: bool = True) -> None:
        self.fd = fd
        self.window = window
        self.drop = drop
        self._sync_file_range = _libc_sync_file_range()
        self.enabled = self._sync_file_range is not None
        self._started = 0  # writeback started for [0, _started)
        self._settled = 0  # written back (and dropped) for [0, _settled)

    def wrote(self, end: int) -> None:
        """The data up to byte ``end`` is in the page cache (blocking; a worker thread)."""
        while self.enabled and end - self._started >= self.window:
            start = self._started
            self._call(start, self.window, _SYNC_FILE_RANGE_WRITE)
            self._started = start + self.window
            if start > self._settled:  # the window before: wait for it, then let it go
                self._settle(start)

    def finish(self) -> None:
        """After the final ``fsync``: drop what is left of the file from the page cache."""
        if self.drop:
            _drop(self.fd, self._settled, 0)  # 0: to the end of the file

    def _settle(self, end: int) -> None:
        flags = _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE | _SYNC_FILE_RANGE_WAIT_AFTER
        self._call(self._settled, end - self._settled, flags)
        if self.drop:
            _drop(self.fd, self._settled, end - self._settled)
        self._settled = end

    def _call(self, offset: int, count: int, flags: int) -> None:
        assert self._sync_file_range is not None
        code = self._sync_file_range(self.fd, offset, count, flags)
        if not code:
            return
        if code in _UNSUPPORTED:
            self.enabled = False
            return
        raise OSError(code, os.strerror(code))


def _drop(fd: int, offset: int, count: int) -> None:
    """Best effort: pages that are clean are dropped, the rest stay."""
    try:
        os.posix_fadvise(fd, offset, count, os.POSIX_FADV_DONTNEED)
    except (OSError, AttributeError):
        pass


def drop_cached(fd: int, offset: int, count: int) -> None:
    """Drop ``count`` bytes of ``fd`` from ``offset`` from the page cache (best effort),
    for a reader that will not read them again (a restore reading a backup)."""
    _drop(fd, offset, count)
