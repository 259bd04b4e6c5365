"""Streamed reads check that the answer is what was asked for: the bytes go into the
restore by position alone, so a server (or proxy) that ignores ``Range`` or
``If-Match`` must fail the read, not feed it bytes from elsewhere. The servers that
ignore them are simulated on the real moto server by removing the header from the
request before it is sent (botocore's ``before-sign`` event)."""

from __future__ import annotations

import os
from typing import Any

import pytest

from tests.s3.conftest import TEST_PART_SIZE, StorageFactory
from vdistream.errors import StorageError, StorageIntegrityError
from vdistream.storage.s3 import S3Storage

P = TEST_PART_SIZE


async def drop_header(storage: S3Storage, header: str) -> None:
    """Every later GetObject of ``storage`` is sent without ``header``."""

    def drop(request: Any, **_: Any) -> None:
        if header in request.headers:
            del request.headers[header]

    client = await storage._client()
    client.meta.events.register("before-sign.s3.GetObject", drop)


@pytest.mark.asyncio
async def test_a_server_ignoring_range_fails_a_read_past_byte_0(
    make_storage: StorageFactory,
) -> None:
    storage = make_storage()
    data = os.urandom(3 * P)
    await storage.write_bytes("ranges", data)
    buffer = memoryview(bytearray(1000))
    async with await storage.open_source("ranges") as source:
        await drop_header(storage, "Range")
        assert await source.readinto(buffer) == 1000  # from 0: the whole object is right
        assert bytes(buffer) == data[:1000]
        with pytest.raises(StorageError, match="bytes 2000-") as raised:
            await source.readinto(buffer, position=2000)  # would be bytes 0-999 again
    assert "ranges" in str(raised.value)


@pytest.mark.asyncio
async def test_a_server_ignoring_if_match_fails_on_a_replaced_object(
    make_storage: StorageFactory,
) -> None:
    storage = make_storage()
    data = os.urandom(3 * P)
    await storage.write_bytes("replaced", data)
    buffer = memoryview(bytearray(1000))
    async with await storage.open_source("replaced") as source:
        await drop_header(storage, "If-Match")
        assert await source.readinto(buffer) == 1000
        await storage.write_bytes("replaced", os.urandom(3 * P), overwrite=True)
        with pytest.raises(StorageIntegrityError, match="changed"):
            await source.readinto(buffer, position=P)  # a new stream: the new object
