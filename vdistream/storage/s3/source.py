"""``S3Source``: a committed object read with ranged GETs and bounded read-ahead.

Reads are ranged ``GetObject`` calls of ``read_chunk_size`` (8 MiB), aligned to
multiples of it, each sending ``If-Match`` with the ETag seen at open (an object
replaced midway fails with ``StorageIntegrityError``). While reading sequentially inside
``async with source`` it keeps ``read_ahead`` (2) further ranges in flight in its task
group (``tasks``), so restore overlaps network and consumer like backup does; without
``async with``, a read fetches at most the ranges it needs, ``read_ahead`` at a time.
``readinto(position=)`` is supported (a jump drops the read-ahead).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from vdistream.storage.base import SourceBase
from vdistream.storage.s3.errors import ChangedError
from vdistream.storage.s3.tasks import Call, TaskOwner

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from vdistream.storage.s3.storage import S3Storage

__all__ = ("S3Source",)


class S3Source(TaskOwner, SourceBase):
    """Reads a committed object with ranged GETs and bounded read-ahead."""

    def __init__(self, storage: S3Storage, full_key: str, *, size: int, etag: str | None) -> None:
        super().__init__(storage._url(full_key), size)
        self.key = full_key
        self._storage = storage
        self._shared = storage.current_background()
        self._etag = etag
        self._chunk_size = storage.read_chunk_size
        self._chunks: dict[int, Call[bytes]] = {}

    def __repr__(self) -> str:
        return f"<S3Source {self.url} {self._size} bytes>"

    async def _finish(self) -> None:
        await self.close()

    async def _readinto(self, view: memoryview, start: int) -> int:
        sequential = start == self._position
        end = min(self._size, start + view.nbytes)
        done = 0
        async with self._tasks() as group:
            while start + done < end:
                offset = start + done
                index = offset // self._chunk_size
                chunk = await self._chunk(group, index, sequential, end)
                within = offset - index * self._chunk_size
                count = min(len(chunk) - within, view.nbytes - done)
                with memoryview(chunk) as whole, whole[within : within + count] as piece:
                    view[done : done + count] = piece
                done += count
        return done

    async def _chunk(self, group: TaskGroup, index: int, sequential: bool, end: int) -> bytes:
        """Chunk ``index``; keeps the next ``read_ahead`` in flight when sequential
        (without a group of its own: only those this read ends in, before ``end``)."""
        last = (self._size - 1) // self._chunk_size
        if self._background is None:
            last = min(last, (end - 1) // self._chunk_size)
        high = min(index + (self._storage.read_ahead if sequential else 0), last)
        stale = [i for i in self._chunks if i < index or i > high]
        for i in stale:
            self._chunks.pop(i).cancel()  # it ends in the group, at its next checkpoint
        for i in range(index, high + 1):
            if i not in self._chunks:
                fetch = functools.partial(self._fetch, i)
                self._chunks[i] = self._start(group, fetch, f"read of range {i}")
        call = self._chunks[index]
        await call.wait()
        try:
            return call.result(url=self.url)
        except BaseException:
            del self._chunks[index]  # a later read tries again
            raise

    async def _fetch(self, index: int) -> bytes:
        first = index * self._chunk_size
        last = min(self._size, first + self._chunk_size) - 1
        match: dict[str, Any] = {"IfMatch": self._etag} if self._etag else {}
        data: bytes = await self._storage._call(
            f"read bytes {first}-{last}",
            "get_object",
            Key=self.key,
            Range=f"bytes={first}-{last}",
            read=last - first + 1,
            precondition=ChangedError,
            **match,
        )
        return data

    async def _close(self) -> None:
        await self._cancel(self._chunks.values())
        self._chunks.clear()
