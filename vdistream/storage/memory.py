"""``memory://store/prefix``: objects kept in a ``MemoryStore``, for tests and dry runs.

A sink buffers privately in a ``bytearray`` (a copy: the caller's buffer is never kept)
and its bytes enter the store only at ``commit``. Nothing here awaits real work, so the
cancellation contract reduces to "cancelled before starting, or done".
"""

from __future__ import annotations

import builtins
from urllib.parse import unquote, urlsplit

import anyio.lowlevel

from vdistream.errors import (
    StorageExistsError,
    StorageNotFoundError,
    StorageURLError,
)
from vdistream.storage._common import check_key, join_url
from vdistream.storage.base import SinkBase, SourceBase, Storage

__all__ = ("MemorySink", "MemorySource", "MemoryStorage", "MemoryStore", "MemoryStores")


class MemoryStore:
    """The committed objects of one named store: ``objects`` maps full keys to bytes."""

    def __init__(self, name: str = "default") -> None:
        self.name = name
        self.objects: dict[str, bytes] = {}

    def __repr__(self) -> str:
        return f"<MemoryStore {self.name!r}: {len(self.objects)} objects>"


class MemoryStores:
    """Named ``MemoryStore``\\s, created on first use: the registry's ``memory`` factory.

    Every ``open_storage("memory://x/...")`` through the same ``MemoryStores`` sees the
    same store ``x``.
    """

    def __init__(self) -> None:
        self._stores: dict[str, MemoryStore] = {}

    def store(self, name: str) -> MemoryStore:
        """The store called ``name``, created empty if new."""
        return self._stores.setdefault(name, MemoryStore(name))

    def open_storage(self, url: str) -> MemoryStorage:
        """``memory://name`` or ``memory://name/prefix`` as a ``MemoryStorage``."""
        parts = urlsplit(url)
        if parts.scheme.lower() != "memory" or not parts.netloc:
            raise StorageURLError("expected memory://store-name[/prefix]", url=url)
        if parts.query or parts.fragment:
            raise StorageURLError("a memory URL takes no query or fragment", url=url)
        prefix = unquote(parts.path).strip("/")
        return MemoryStorage(self.store(unquote(parts.netloc)), prefix)


class MemoryStorage(Storage):
    """Objects under ``prefix`` in ``store`` (a fresh private store if none is given)."""

    def __init__(self, store: MemoryStore | None = None, prefix: str = "") -> None:
        self.store = MemoryStore() if store is None else store
        base = f"memory://{self.store.name}"
        self.prefix = check_key(prefix, url=base) if prefix else ""
        self.url = join_url(base, self.prefix) if prefix else base

    def __repr__(self) -> str:
        return f"<MemoryStorage {self.url}>"

    def _full_key(self, key: str) -> str:
        check_key(key, url=self.url)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _committed(self, key: str) -> bytes:
        try:
            return self.store.objects[self._full_key(key)]
        except KeyError:
            raise StorageNotFoundError("no such object", url=join_url(self.url, key)) from None

    # Each method yields to the scheduler first and then works without yielding, so
    # a cancellation lands before anything happened, never after.

    async def open_sink(self, key: str, *, device: str | None = None) -> MemorySink:
        await anyio.lowlevel.checkpoint()
        full_key = self._full_key(key)
        return MemorySink(self.store, full_key, url=join_url(self.url, key), device=device)

    async def open_source(self, key: str) -> MemorySource:
        await anyio.lowlevel.checkpoint()
        return MemorySource(self._committed(key), url=join_url(self.url, key))

    async def list(self, prefix: str = "") -> builtins.list[str]:
        await anyio.lowlevel.checkpoint()
        own = f"{self.prefix}/" if self.prefix else ""
        return sorted(
            full[len(own) :]
            for full in self.store.objects
            if full.startswith(own) and full[len(own) :].startswith(prefix)
        )

    async def stat(self, key: str) -> int:
        await anyio.lowlevel.checkpoint()
        return len(self._committed(key))

    async def delete(self, key: str) -> None:
        await anyio.lowlevel.checkpoint()
        self._committed(key)
        del self.store.objects[self._full_key(key)]

    async def replace_bytes(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """One assignment: atomic for every reader (nothing here is durable anyway)."""
        await anyio.lowlevel.checkpoint()
        self._committed(key)
        self.store.objects[self._full_key(key)] = bytes(data)


class MemorySink(SinkBase):
    """Buffers in a private ``bytearray``; ``commit`` moves it into the store."""

    def __init__(self, store: MemoryStore, key: str, *, url: str, device: str | None) -> None:
        super().__init__(url, device)
        self._store = store
        self._key = key
        self._buffer = bytearray()

    async def _write(self, view: memoryview, start: int) -> None:
        if view.nbytes:
            if start > len(self._buffer):
                self._buffer.extend(bytes(start - len(self._buffer)))
            self._buffer[start : start + view.nbytes] = view  # copies

    async def _publish(self) -> None:
        if self._key in self._store.objects:
            raise StorageExistsError(
                "commit refused: an object is already committed under this key",
                url=self.url,
                device=self.device,
            )
        self._store.objects[self._key] = bytes(self._buffer)
        self._buffer = bytearray()

    async def _discard(self) -> None:
        self._buffer = bytearray()


class MemorySource(SourceBase):
    """Reads a committed ``bytes`` object; positional reads allowed."""

    def __init__(self, data: bytes, *, url: str) -> None:
        super().__init__(url, len(data))
        self._data = data

    async def _readinto(self, view: memoryview, start: int) -> int:
        count = max(0, min(view.nbytes, len(self._data) - start))
        view[:count] = memoryview(self._data)[start : start + count]
        return count
