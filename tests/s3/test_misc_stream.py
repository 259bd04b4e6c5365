"""Streamed reads (``S3Source`` with ``read_ahead=None``, the default): one GET per
sequential read of an object, a new one after a jump or a failure, the bytes identical
through faults, a persistent fault a ``StorageError``."""

from __future__ import annotations

import os
import re

import pytest

from tests.s3.conftest import TEST_PART_SIZE, StorageFactory
from tests.s3.proxy import FaultProxy
from vdistream.errors import StorageError, StorageIntegrityError

P = TEST_PART_SIZE


def object_gets(proxy: FaultProxy, key: str) -> list[str]:
    return [line for line in proxy.requests if re.match(rf"^GET /\S*/{re.escape(key)}$", line)]


@pytest.mark.asyncio
async def test_a_sequential_read_is_one_get(faulty: StorageFactory, proxy: FaultProxy) -> None:
    storage = faulty()
    assert storage.read_ahead is None
    data = os.urandom(5 * P + 17)
    await storage.write_bytes("seq", data)
    got = bytearray()
    buffer = memoryview(bytearray(40_000))
    async with await storage.open_source("seq") as source:
        while count := await source.readinto(buffer):
            got += buffer[:count]
    assert bytes(got) == data
    assert len(object_gets(proxy, "seq")) == 1


@pytest.mark.asyncio
async def test_a_jump_opens_a_new_stream_there(faulty: StorageFactory, proxy: FaultProxy) -> None:
    storage = faulty()
    data = os.urandom(4 * P)
    await storage.write_bytes("jump", data)
    buffer = memoryview(bytearray(1000))
    source = await storage.open_source("jump")
    try:
        assert await source.readinto(buffer) == 1000
        assert bytes(buffer) == data[:1000]
        assert await source.readinto(buffer, position=3 * P + 5) == 1000
        assert bytes(buffer) == data[3 * P + 5 : 3 * P + 1005]
        assert await source.readinto(buffer) == 1000  # continues the second stream
        assert bytes(buffer) == data[3 * P + 1005 : 3 * P + 2005]
        assert await source.readinto(buffer, position=len(data) - 10) == 10
        assert bytes(buffer[:10]) == data[-10:]
        assert await source.readinto(buffer) == 0
    finally:
        await source.close()
    assert len(object_gets(proxy, "jump")) == 3


@pytest.mark.asyncio
async def test_streamed_reads_survive_faults(
    make_storage: StorageFactory, faulty: StorageFactory, proxy: FaultProxy
) -> None:
    data = os.urandom(9 * P + 5)
    await make_storage().write_bytes("obj", data)
    proxy.add("error", r"^GET ", count=2)  # at open: retried by the request's own loop
    proxy.add("cut", r"^GET ", after_bytes=1000)  # mid-body: a new stream where it stopped
    proxy.add("stall", r"^GET ", seconds=0.2)  # then reset
    proxy.add("reset", r"^GET ")
    proxy.add("error", r"^GET ", status=500, code="InternalError")
    storage = faulty()
    got = bytearray()
    buffer = memoryview(bytearray(50_000))
    async with await storage.open_source("obj") as source:
        while count := await source.readinto(buffer):
            got += buffer[:count]
    for fault in proxy.faults:
        assert fault.hits == fault.count, (fault, proxy.requests)
    assert bytes(got) == data


@pytest.mark.asyncio
async def test_a_body_that_keeps_failing_is_a_storage_error(
    make_storage: StorageFactory, faulty: StorageFactory, proxy: FaultProxy
) -> None:
    data = os.urandom(3 * P)
    await make_storage().write_bytes("broken", data)
    storage = faulty(max_attempts=3)
    buffer = memoryview(bytearray(P))
    async with await storage.open_source("broken") as source:
        proxy.add("cut", r"^GET ", after_bytes=0, count=100)  # every body cut at once
        with pytest.raises(StorageError, match="broken") as raised:
            await source.readinto(buffer)
    assert not isinstance(raised.value, StorageIntegrityError)
    # max_attempts requests, each perhaps resent once by aiohttp (an idempotent GET on a
    # pooled connection that dropped): bounded, never endless
    assert 3 <= len(object_gets(proxy, "broken")) <= 6


@pytest.mark.asyncio
async def test_an_object_replaced_before_the_stream_opens_fails(
    make_storage: StorageFactory,
) -> None:
    storage = make_storage()
    await storage.write_bytes("moving", os.urandom(3 * P))
    buffer = memoryview(bytearray(P))
    async with await storage.open_source("moving") as source:
        await storage.write_bytes("moving", os.urandom(3 * P), overwrite=True)
        with pytest.raises(StorageIntegrityError, match="PreconditionFailed"):
            await source.readinto(buffer)


@pytest.mark.asyncio
async def test_ranged_reads_stay_available(make_storage: StorageFactory) -> None:
    storage = make_storage(read_ahead=1)
    data = os.urandom(3 * P + 1)
    await storage.write_bytes("ranged", data)
    async with await storage.open_source("ranged") as source:
        buffer = memoryview(bytearray(len(data)))
        assert await source.readinto(buffer) == len(data)
        assert bytes(buffer) == data
