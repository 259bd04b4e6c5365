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

from typing import TYPE_CHECKING, Any

from azure.core import MatchConditions

from vdistream.errors import StorageIntegrityError
from vdistream.storage._streams import RangedSource

if TYPE_CHECKING:
    from vdistream.storage.azure.storage import AzureStorage

__all__ = ("AzureSource",)


class AzureSource(RangedSource):
    """Reads a committed blob with ranged downloads (see the module docstring)."""

    def __init__(self, storage: AzureStorage, full_key: str, *, size: int, etag: str) -> None:
        super().__init__(storage._url(full_key), size, chunk_size=storage.read_chunk_size)
        self.key = full_key
        self._storage = storage
        self._shared = storage.current_background()
        self._etag = etag

    def __repr__(self) -> str:
        return f"<AzureSource {self.url} {self._size} bytes>"

    async def _readinto(self, view: memoryview, start: int) -> int:
        return await self._read_ranges(view, start)

    def _read_ahead(self) -> int:
        return self._storage.read_ahead

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
        await self._drop_chunks()
