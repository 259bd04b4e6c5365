"""SHA-256 of what reached the medium, computed as the bytes pass.

``HashingSink`` wraps a sink and hashes every buffer before handing it on;
``HashingSource`` hashes what it reads. Hashing runs in a worker thread (hashlib
releases the GIL on large buffers), so devices hash in parallel and the event loop
never stalls. The threads are ``vdistream.threads``' pool, shared with file I/O; a
``limiter`` of its own per job bounds that job's share. The thread call waits for the
thread even when cancelled, so a buffer is never handed back while it is being hashed.

When the sink below does its writes as plain blocking work (``Sink.blocking_writes``:
files, ``null://``, the compression and encryption stages over them), hashing and
writing run in ONE worker-thread call per buffer (``write_blocking``): the bytes are
read once while still in the CPU's cache, and the event loop hands over one call per
command instead of one per stage. Reads from a blocking source are fused the same way.
Otherwise (S3) the hash runs in a worker thread beside the sink's own write.

A sink written at positions out of order (a disk-like device seeking back) cannot be
hashed on the fly; ``HashingSink.sha256`` is then ``None`` and the caller hashes the
committed object by reading it back.
"""

from __future__ import annotations

import functools
import hashlib

import anyio
import anyio.lowlevel

from vdistream import threads
from vdistream.storage import Sink, Source

__all__ = ("HashingSink", "HashingSource")

_SMALL = 64 * 1024  # below this, a thread hop costs more than the hash


class _Hashing:
    """The SHA-256 of the bytes passing, while they pass in order; with ``digest=False``
    nothing is hashed and ``sha256`` is None (the counts remain)."""

    def __init__(self, limiter: anyio.CapacityLimiter | None, digest: bool = True) -> None:
        self.limiter = limiter
        self._hasher = hashlib.sha256()
        self._sequential = digest  # False from the start: hash nothing

    @property
    def sha256(self) -> str | None:
        """Hex SHA-256 of the stream, or None if it was accessed out of order (or not
        hashed at all)."""
        return self._hasher.hexdigest() if self._sequential else None

    async def _update(self, data: memoryview) -> None:
        if data.nbytes < _SMALL:
            self._hasher.update(data)
        else:
            await threads.run_sync(self._hasher.update, data, limiter=self.limiter)


class HashingSink(_Hashing, Sink):
    """Hashes every buffer on its way to ``inner``; otherwise ``inner`` itself (its
    random access, counters, states and errors)."""

    def __init__(
        self, inner: Sink, *, limiter: anyio.CapacityLimiter | None = None, digest: bool = True
    ) -> None:
        super().__init__(limiter, digest)
        self.inner = inner
        self.url = inner.url
        self.device = inner.device

    @property
    def random_access(self) -> bool:
        return self.inner.random_access

    @property
    def bytes_written(self) -> int:
        return self.inner.bytes_written

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def blocking_writes(self) -> bool:
        return self.inner.blocking_writes

    def write_blocking(self, data: memoryview, *, position: int | None = None) -> None:
        if position is not None and position != self.inner.size:
            self._sequential = False
        if self._sequential:
            self._hasher.update(data)
        self.inner.write_blocking(data, position=position)

    async def write(self, data: memoryview, *, position: int | None = None) -> None:
        if self.inner.blocking_writes:
            await anyio.lowlevel.checkpoint_if_cancelled()  # then the call runs to its end
            call = functools.partial(self.write_blocking, data, position=position)
            await threads.run_sync(call, limiter=self.limiter)
            return
        if position is not None and position != self.inner.size:
            self._sequential = False
        if not self._sequential or data.nbytes < _SMALL:
            if self._sequential:
                self._hasher.update(data)
            await self.inner.write(data, position=position)
            return
        # Hash and store at once: both only read the buffer, and the task group
        # returns only when both are done with it.
        failed: list[Exception] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._update, data)
            try:
                await self.inner.write(data, position=position)
            except Exception as exc:  # raised after the group, not as an ExceptionGroup
                failed.append(exc)
        if failed:
            raise failed[0]

    async def flush(self) -> None:
        await self.inner.flush()

    async def commit(self) -> None:
        await self.inner.commit()

    async def abort(self) -> None:
        await self.inner.abort()


class HashingSource(_Hashing, Source):
    """Hashes what is read from ``inner``."""

    def __init__(
        self, inner: Source, *, limiter: anyio.CapacityLimiter | None = None, digest: bool = True
    ) -> None:
        super().__init__(limiter, digest)
        self.inner = inner
        self.url = inner.url
        self.bytes_read = 0

    @property
    def random_access(self) -> bool:
        return self.inner.random_access

    @property
    def size(self) -> int | None:
        return self.inner.size

    @property
    def blocking_reads(self) -> bool:
        return self.inner.blocking_reads

    def readinto_blocking(self, buffer: memoryview, *, position: int | None = None) -> int:
        if position is not None and position != self.bytes_read:
            self._sequential = False
        got = self.inner.readinto_blocking(buffer, position=position)
        if self._sequential and got:
            self._hasher.update(buffer[:got])
        self.bytes_read += got
        return got

    async def readinto(self, buffer: memoryview, *, position: int | None = None) -> int:
        if self.inner.blocking_reads:
            await anyio.lowlevel.checkpoint_if_cancelled()  # then the call runs to its end
            call = functools.partial(self.readinto_blocking, buffer, position=position)
            return await threads.run_sync(call, limiter=self.limiter)
        if position is not None and position != self.bytes_read:
            self._sequential = False
        got = await self.inner.readinto(buffer, position=position)
        if self._sequential and got:
            await self._update(buffer[:got])
        self.bytes_read += got
        return got

    async def close(self) -> None:
        await self.inner.close()
