"""Azure block blobs against Azurite: blocks staged in parallel (bounded), committed only
at commit with the sink's own block list, never over an existing blob, and nothing left
by an abort; a blob replaced under a reader is detected."""

from __future__ import annotations

import hashlib
import os

import anyio
import pytest

from tests.azure.azurite import Azurite
from tests.azure.conftest import StorageFactory
from tests.s3.proxy import FaultProxy
from vdistream.errors import StorageExistsError, StorageIntegrityError, StorageNotFoundError
from vdistream.storage.azure import AzureStorage
from vdistream.storage.azure.blocks import block_id

pytestmark = pytest.mark.asyncio

BLOCK = 64 << 10
#: a stage-block request (PUT ...?comp=block&blockid=...), not the block list
STAGE = r"^PUT \S+\?(\S*&)?comp=block(&|$)"


async def test_blocks_are_staged_in_parallel_and_committed_only_at_commit(
    make_storage: StorageFactory, azurite: Azurite, container: str, proxy: FaultProxy
) -> None:
    """The proxy holds every staging 0.3 s, so a sink that staged one block at a time
    would never have two in flight; the sink's counted peak must reach its bound, and
    never pass it. Azurite holds the blocks uncommitted (no blob listed) until commit,
    then exactly the sink's blocks, in order."""
    delays = proxy.add("delay", STAGE, count=1_000, seconds=0.3)
    storage = make_storage(endpoint=proxy.endpoint.rstrip("/") + "/devstoreaccount1")
    data = os.urandom(10 * BLOCK + 123)
    async with await storage.open_sink("db/stream.vdi", device="dev0") as sink:
        await sink.write(memoryview(data))
        await sink.flush()
        assert sink.peak_blocks_in_flight == storage.max_blocks_in_flight == 4
        assert azurite.blobs(container) == []  # nothing visible yet
        assert azurite.blobs(container, uncommitted=True) == ["backups/db/stream.vdi"]
        assert await storage.list() == []
        with pytest.raises(StorageNotFoundError):
            await storage.stat("db/stream.vdi")
        await sink.commit()
    assert delays.hits == 11  # ten full blocks and the last, partial one
    assert sink.blocks == (*[BLOCK] * 10, 123)
    assert azurite.blobs(container) == ["backups/db/stream.vdi"]
    blob = azurite.service.get_blob_client(container, "backups/db/stream.vdi")
    committed, uncommitted = blob.get_block_list("all")
    assert [block.id for block in committed] == [block_id(sink.token, n) for n in range(1, 12)]
    assert uncommitted == []
    stored = azurite.get(container, "backups/db/stream.vdi")
    assert hashlib.sha256(stored).hexdigest() == hashlib.sha256(data).hexdigest()
    assert blob.get_blob_properties().metadata[AzureStorage.WRITER] == sink.token


async def test_a_staged_stream_never_overwrites_and_abort_leaves_nothing(
    make_storage: StorageFactory, azurite: Azurite, container: str
) -> None:
    storage = make_storage()
    old = os.urandom(BLOCK + 1000)
    early = await storage.open_sink("b/s1.vdi")
    await early.write(memoryview(os.urandom(3 * BLOCK)))
    await early.flush()
    assert early.blocks == (BLOCK,) * 3
    second = await storage.open_sink("b/s1.vdi")  # another writer of the key commits first
    await second.write(memoryview(old))
    await second.commit()
    with pytest.raises(StorageExistsError, match=r"BlobAlreadyExists.*azure://devstoreaccount1/"):
        await early.commit()
    assert azurite.get(container, "backups/b/s1.vdi") == old
    await early.abort()
    assert azurite.get(container, "backups/b/s1.vdi") == old

    dropped = await storage.open_sink("b/s2.vdi")
    await dropped.write(memoryview(os.urandom(2 * BLOCK + 5)))
    await dropped.flush()
    assert azurite.blobs(container, uncommitted=True) == ["backups/b/s2.vdi"]
    await dropped.abort()
    assert azurite.blobs(container, uncommitted=True) == []
    assert azurite.blobs(container) == ["backups/b/s1.vdi"]  # the abort's empty blob is gone

    # A small object committed where only someone's staged blocks are (Azurite refuses
    # a conditional Put Blob there): it is committed all the same, as one block.
    staged = await storage.open_sink("b/s3.vdi")
    await staged.write(memoryview(os.urandom(2 * BLOCK)))
    await staged.flush()
    await storage.write_bytes("b/s3.vdi", b"small")
    assert azurite.get(container, "backups/b/s3.vdi") == b"small"
    with pytest.raises(StorageExistsError):
        await staged.commit()
    await staged.abort()
    assert azurite.get(container, "backups/b/s3.vdi") == b"small"


async def test_a_blob_replaced_under_a_reader_is_detected(
    make_storage: StorageFactory, azurite: Azurite, container: str
) -> None:
    storage = make_storage(read_ahead=0)
    await storage.write_bytes("obj", os.urandom(3 * BLOCK))
    buffer = memoryview(bytearray(BLOCK))
    async with await storage.open_source("obj") as source:
        assert await source.readinto(buffer) == BLOCK
        await storage.write_bytes("obj", os.urandom(3 * BLOCK), overwrite=True)
        with pytest.raises(StorageIntegrityError, match=r"ConditionNotMet"):
            await source.readinto(buffer)


async def test_a_large_stream_reads_back_through_read_ahead(
    make_storage: StorageFactory,
) -> None:
    storage = make_storage(read_ahead=3, read_chunk_size=256 << 10)
    data = os.urandom((2 << 20) + 7)
    await storage.write_bytes("big", data)  # > 1 MiB: one staged block and its list
    out = bytearray()
    buffer = memoryview(bytearray(100_000))
    async with storage.background(), await storage.open_source("big") as source:
        while count := await source.readinto(buffer):
            out += buffer[:count]
    assert out == data


async def test_an_abort_outlasts_a_staging_that_lands_late(
    make_storage: StorageFactory, azurite: Azurite, container: str, proxy: FaultProxy
) -> None:
    """The abort stops waiting for the block in flight (``abort_wait``) and cancels it,
    but the proxy already holds the whole request and hands it to Azurite 0.3 s later,
    after the abort's first removal: its checks see the block land and remove it too."""
    held = proxy.add("delay", STAGE, count=1, seconds=0.3)
    storage = make_storage(endpoint=f"{proxy.endpoint}/devstoreaccount1", abort_wait=0.05)
    async with await storage.open_sink("late.vdi") as sink:
        await sink.write(memoryview(os.urandom(BLOCK)))  # staged in the sink's group
        with anyio.fail_after(10):
            while not held.hits:  # noqa: ASYNC110 (the proxy counts, it has no event)
                await anyio.sleep(0.01)
        await sink.abort()
    await anyio.sleep(1.0)  # anything still on its way has landed by now
    assert azurite.blobs(container, uncommitted=True) == []
    assert azurite.blobs(container) == []
