"""null:// storage: counts and discards."""

from __future__ import annotations

import pytest

from vdistream.errors import StorageError, StorageNotFoundError, StorageURLError
from vdistream.storage import NullSink, NullStorage, StorageRegistry


@pytest.mark.asyncio
async def test_sink_counts_and_commits_but_keeps_nothing() -> None:
    storage = StorageRegistry.with_builtins().open_storage("null://")
    assert isinstance(storage, NullStorage)
    async with await storage.open_sink("dev0.bak", device="dev0") as sink:
        assert isinstance(sink, NullSink)
        await sink.write(memoryview(bytes(1000)))
        await sink.write(memoryview(b"xy"), position=5000)
        await sink.write(memoryview(b"z"))
        await sink.flush()
        assert (sink.bytes_written, sink.size, sink.random_access) == (1003, 5003, True)
        assert sink.url == "null://dev0.bak"
        await sink.commit()
    await sink.abort()  # no-op after commit
    with pytest.raises(StorageError, match="committed"):
        await sink.write(memoryview(b"late"))
    assert await storage.list() == []
    await storage.write_bytes("manifest", b"{}")
    assert await storage.list() == []


@pytest.mark.asyncio
async def test_nothing_can_be_read_stat_or_deleted() -> None:
    storage = NullStorage()
    await storage.write_bytes("k", b"data")
    with pytest.raises(StorageNotFoundError, match="keeps nothing") as caught:
        await storage.open_source("k")
    assert caught.value.url == "null://k"
    with pytest.raises(StorageNotFoundError):
        await storage.stat("k")
    with pytest.raises(StorageNotFoundError):
        await storage.delete("k")
    with pytest.raises(StorageNotFoundError):
        await storage.read_bytes("k")
    with pytest.raises(StorageURLError):
        await storage.open_sink("../k")


@pytest.mark.asyncio
async def test_aborted_sink_refuses_work() -> None:
    sink = await NullStorage().open_sink("k")
    await sink.abort()
    await sink.abort()
    with pytest.raises(StorageError, match="aborted"):
        await sink.commit()
    with pytest.raises(StorageError, match="aborted"):
        await sink.flush()


def test_from_url_rejects_other_schemes() -> None:
    with pytest.raises(StorageURLError):
        NullStorage.from_url("file:///x")
