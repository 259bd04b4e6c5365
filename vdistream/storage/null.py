"""``null://``: discards every byte, for measuring the path without the medium.

Sinks count what they are given and commit successfully; nothing is ever stored, so
``list`` is empty and every read, ``stat`` or ``delete`` raises
``StorageNotFoundError``.
"""

from __future__ import annotations

import builtins
from urllib.parse import urlsplit

import anyio.lowlevel

from vdistream.errors import StorageNotFoundError, StorageURLError
from vdistream.storage._common import check_key, join_url
from vdistream.storage.base import SinkBase, Source, Storage

__all__ = ("NullSink", "NullStorage")


class NullStorage(Storage):
    """Accepts everything, keeps nothing."""

    def __init__(self, url: str = "null://") -> None:
        self.url = url

    @classmethod
    def from_url(cls, url: str) -> NullStorage:
        """``null://`` (anything after it is kept only as a label)."""
        if urlsplit(url).scheme.lower() != "null":
            raise StorageURLError("expected a null:// URL", url=url)
        return cls(url)

    def __repr__(self) -> str:
        return f"<NullStorage {self.url}>"

    def _missing(self, key: str) -> StorageNotFoundError:
        check_key(key, url=self.url)
        return StorageNotFoundError("the null storage keeps nothing", url=join_url(self.url, key))

    async def open_sink(self, key: str, *, device: str | None = None) -> NullSink:
        check_key(key, url=self.url)
        await anyio.lowlevel.checkpoint()
        return NullSink(url=join_url(self.url, key), device=device)

    async def open_source(self, key: str) -> Source:
        raise self._missing(key)

    async def list(self, prefix: str = "") -> builtins.list[str]:
        await anyio.lowlevel.checkpoint()
        return []

    async def stat(self, key: str) -> int:
        raise self._missing(key)

    async def delete(self, key: str) -> None:
        raise self._missing(key)


class NullSink(SinkBase):
    """Counts bytes and positions like a real sink, then forgets them."""

    BLOCKING_WRITES = True

    def __init__(self, *, url: str, device: str | None = None) -> None:
        super().__init__(url, device)

    async def _write(self, view: memoryview, start: int) -> None:
        return None

    def _write_blocking(self, view: memoryview, start: int) -> None:
        return None

    async def _publish(self) -> None:
        return None

    async def _discard(self) -> None:
        return None
