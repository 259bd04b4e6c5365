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
from vdistream.storage._common import (
    SinkState,
    byte_view,
    check_key,
    check_position,
    join_url,
    require,
)
from vdistream.storage.base import Sink, Source, Storage

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


class NullSink(Sink):
    """Counts bytes and positions like a real sink, then forgets them."""

    def __init__(self, *, url: str, device: str | None = None) -> None:
        self.url = url
        self.device = device
        self._position = 0
        self._size = 0
        self._written = 0
        self._state = SinkState.OPEN

    @property
    def random_access(self) -> bool:
        return True

    @property
    def bytes_written(self) -> int:
        return self._written

    @property
    def size(self) -> int:
        return self._size

    async def write(self, data: memoryview, *, position: int | None = None) -> None:
        require(self._state, SinkState.OPEN, what="write", url=self.url, device=self.device)
        check_position(position, random_access=True, url=self.url, device=self.device)
        await anyio.lowlevel.checkpoint_if_cancelled()
        count = byte_view(data).nbytes
        start = self._position if position is None else position
        if count:
            self._size = max(self._size, start + count)
        self._position = start + count
        self._written += count

    async def flush(self) -> None:
        require(self._state, SinkState.OPEN, what="flush", url=self.url, device=self.device)
        await anyio.lowlevel.checkpoint_if_cancelled()

    async def commit(self) -> None:
        if self._state is SinkState.COMMITTED:
            return
        require(self._state, SinkState.OPEN, what="commit", url=self.url, device=self.device)
        await anyio.lowlevel.checkpoint_if_cancelled()
        self._state = SinkState.COMMITTED

    async def abort(self) -> None:
        if self._state is not SinkState.COMMITTED:
            self._state = SinkState.ABORTED
