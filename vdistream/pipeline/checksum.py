"""SHA-256 of what reached the medium, computed as the bytes pass.

``HashingSink`` wraps a sink and hashes every buffer before handing it on;
``HashingSource`` hashes what it reads. Hashing runs in a worker thread (hashlib
releases the GIL on large buffers), so devices hash in parallel and the event loop
never stalls. The threads are ``vdistream.threads``' pool, shared with file I/O; a
``limiter`` of its own per job bounds that job's share. The thread call waits for the
thread even when cancelled, so a buffer is never handed back while it is being hashed.

A sink written at positions out of order (a disk-like device seeking back) cannot be
hashed on the fly; ``HashingSink.sha256`` is then ``None`` and the caller hashes the
committed object by reading it back.
"""

from __future__ import annotations

import hashlib

import anyio

from vdistream import threads
from vdistream.storage import Sink, Source

__all__ = ("HashingSink", "HashingSource")

_SMALL = 64 * 1024  # below this, a thread hop costs more than the hash


class _Hashing:
    """The SHA-256 of the bytes passing, while they pass in order."""

    def __init__(self, limiter: anyio.CapacityLimiter | None) -> None:
        self.limiter = limiter
        self._hasher = hashlib.sha256()
        self._sequential = True

    @property
    def sha256(self) -> str | None:
        """Hex SHA-256 of the stream, or None if it was accessed out of order."""
        return self._hasher.hexdigest() if self._sequential else None

    async def _update(self, data: memoryview) -> None:
        if data.nbytes < _SMALL:
            self._hasher.update(data)
        else:
            await threads.run_sync(self._hasher.update, data, limiter=self.limiter)


class HashingSink(_Hashing, Sink):
    """Hashes every buffer on its way to ``inner``; otherwise ``inner`` itself (its
    random access, counters, states and errors)."""

    def __init__(self, inner: Sink, *, limiter: anyio.CapacityLimiter | None = None) -> None:
        super().__init__(limiter)
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

    async def write(self, data: memoryview, *, position: int | None = None) -> None:
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

    def __init__(self, inner: Source, *, limiter: anyio.CapacityLimiter | None = None) -> None:
        super().__init__(limiter)
        self.inner = inner
        self.url = inner.url
        self.bytes_read = 0

    @property
    def random_access(self) -> bool:
        return self.inner.random_access

    @property
    def size(self) -> int | None:
        return self.inner.size

    async def readinto(self, buffer: memoryview, *, position: int | None = None) -> int:
        if position is not None and position != self.bytes_read:
            self._sequential = False
        got = await self.inner.readinto(buffer, position=position)
        if self._sequential and got:
            await self._update(buffer[:got])
        self.bytes_read += got
        return got

    async def close(self) -> None:
        await self.inner.close()
