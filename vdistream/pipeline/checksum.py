"""SHA-256 of what reached the medium, computed as the bytes pass.

``HashingSink`` wraps a sink and hashes every buffer before handing it on;
``HashingSource`` hashes what it reads. Hashing runs in a worker thread (hashlib
releases the GIL on large buffers), so devices hash in parallel and the event loop
never stalls (pass a ``limiter`` of its own per job, so that hashing cannot starve
file I/O of threads); the thread call waits for the thread even when cancelled, so a buffer
is never handed back while it is being hashed.

A sink written at positions out of order (a disk-like device seeking back) cannot be
hashed on the fly; ``HashingSink.sha256`` is then ``None`` and the caller hashes the
committed object by reading it back.
"""

from __future__ import annotations

import hashlib

import anyio.to_thread

from vdistream.storage import Sink, Source

__all__ = ("HashingSink", "HashingSource")

_SMALL = 64 * 1024  # below this, a thread hop costs more than the hash


async def _update(
    hasher: hashlib._Hash, data: memoryview, limiter: anyio.CapacityLimiter | None
) -> None:
    if data.nbytes < _SMALL:
        hasher.update(data)
    else:
        await anyio.to_thread.run_sync(hasher.update, data, limiter=limiter)


class HashingSink(Sink):
    def __init__(self, inner: Sink, *, limiter: anyio.CapacityLimiter | None = None) -> None:
        self.inner = inner
        self.limiter = limiter
        self.url = inner.url
        self.device = inner.device
        self._hasher = hashlib.sha256()
        self._sequential = True

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
    def sha256(self) -> str | None:
        """Hex SHA-256 of the object as stored, or None if it was written out of order."""
        return self._hasher.hexdigest() if self._sequential else None

    async def write(self, data: memoryview, *, position: int | None = None) -> None:
        if position is not None and position != self.inner.size:
            self._sequential = False
        if not self._sequential:
            await self.inner.write(data, position=position)
        elif data.nbytes < _SMALL:
            self._hasher.update(data)
            await self.inner.write(data, position=position)
        else:
            # Hash and store at once: both only read the buffer, and the task group
            # returns only when both are done with it.
            failed: list[Exception] = []
            async with anyio.create_task_group() as tg:
                tg.start_soon(_update, self._hasher, data, self.limiter)
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


class HashingSource(Source):
    def __init__(self, inner: Source, *, limiter: anyio.CapacityLimiter | None = None) -> None:
        self.inner = inner
        self.limiter = limiter
        self.url = inner.url
        self._hasher = hashlib.sha256()
        self._sequential = True
        self.bytes_read = 0

    @property
    def random_access(self) -> bool:
        return self.inner.random_access

    @property
    def size(self) -> int | None:
        return self.inner.size

    @property
    def sha256(self) -> str | None:
        return self._hasher.hexdigest() if self._sequential else None

    async def readinto(self, buffer: memoryview, *, position: int | None = None) -> int:
        if position is not None and position != self.bytes_read:
            self._sequential = False
        got = await self.inner.readinto(buffer, position=position)
        if self._sequential and got:
            await _update(self._hasher, buffer[:got], self.limiter)
        self.bytes_read += got
        return got

    async def close(self) -> None:
        await self.inner.close()
