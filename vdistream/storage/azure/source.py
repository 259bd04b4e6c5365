"""``AzureSource``: a committed blob read with ranged downloads and bounded read-ahead.

Reads are ranged ``Get Blob`` calls of ``read_chunk_size`` (8 MiB), aligned to
multiples of it, each sent with ``If-Match`` and the ETag seen at open: a blob replaced
midway fails with ``StorageIntegrityError`` instead of mixing two objects' bytes. While
reading sequentially inside ``async with source`` (or a job's ``storage.background()``)
it keeps ``read_ahead`` (2) further ranges in flight in its task group, so a restore
overlaps network and consumer like a backup does; memory is at most ``read_ahead + 1``
chunks. Without a group a read fetches only the ranges it needs. ``readinto(position=)``
is supported (a jump drops the read-ahead). A range that comes back shorter than asked
fails (``StorageIntegrityError``); the SDK retries broken connections itself.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from azure.core import MatchConditions

from vdistream.errors import StorageIntegrityError
from vdistream.storage.base import SourceBase
from vdistream.storage.s3.tasks import Call, TaskOwner

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from vdistream.storage.azure.storage import AzureStorage

__all__ = ("AzureSource",)


class AzureSource(TaskOwner, SourceBase):
    """Reads a committed blob with ranged downloads (see the module docstring)."""

    def __init__(self, storage: AzureStorage, full_key: str, *, size: int, etag: str) -> None:
        super().__init__(storage._url(full_key), size)
        self.key = full_key
        self._storage = storage
        self._shared = storage.current_background()
        self._etag = etag
        self._chunk_size = storage.read_chunk_size
        self._chunks: dict[int, Call[bytes]] = {}

    def __repr__(self) -> str:
        return f"<AzureSource {self.url} {self._size} bytes>"

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
        for stale in [i for i in self._chunks if i < index or i > high]:
            self._chunks.pop(stale).cancel()
        for i in range(index, high + 1):
            if i not in self._chunks:
                self._chunks[i] = self._start(
                    group, functools.partial(self._fetch, i), f"read of range {i}"
                )
        call = self._chunks[index]
        await call.wait()
        try:
            return call.result(url=self.url)
        except BaseException:
            del self._chunks[index]  # a later read tries again
            raise

    async def _fetch(self, index: int) -> bytes:
        storage = self._storage
        first = index * self._chunk_size
        length = min(self._size, first + self._chunk_size) - first
        blob = await storage._blob(self.key)
        what = f"read bytes {first}-{first + length - 1}"

        async def download(**options: Any) -> bytes:
            downloader = await blob.download_blob(
                offset=first,
                length=length,
                etag=self._etag,
                max_concurrency=1,
                match_condition=MatchConditions.IfNotModified,  # If-Match: the ETag at open
                **options,
            )
            data: bytes = await downloader.readall()
            return data

        data = await storage._call(what, download, blob=self.key, exists=StorageIntegrityError)
        if len(data) != length:
            raise StorageIntegrityError(
                f"{what} failed: got {len(data)} of {length} bytes; container "
                f"{storage.container!r}, blob {self.key!r}",
                url=self.url,
            )
        return data

    async def _close(self) -> None:
        await self._cancel(self._chunks.values())
        self._chunks.clear()
