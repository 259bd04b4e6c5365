"""The SDK's retries, bounded, seen through the fault proxy in front of Azurite: a busy
server is retried and counted (``observe_retries``); a commit whose answer is lost is
replayed, meets its own blob and counts as done; a server that keeps failing is one
line naming the blob."""

from __future__ import annotations

import os

import pytest

from tests.azure.azurite import Azurite
from tests.azure.conftest import StorageFactory
from tests.s3.proxy import FaultProxy
from vdistream.errors import StorageError
from vdistream.storage.s3 import observe_retries

pytestmark = pytest.mark.asyncio

BLOCK = 64 << 10
STAGE = r"^PUT \S+\?(\S*&)?comp=block(&|$)"
BLOCK_LIST = r"^PUT \S+\?(\S*&)?comp=blocklist(&|$)"


def through(proxy: FaultProxy) -> str:
    return f"{proxy.endpoint}/devstoreaccount1"


async def test_a_busy_server_is_retried_and_counted(
    make_storage: StorageFactory, azurite: Azurite, container: str, proxy: FaultProxy
) -> None:
    busy = proxy.add("error", STAGE, count=2, status=503, code="ServerBusy")
    storage = make_storage(endpoint=through(proxy))
    data = os.urandom(3 * BLOCK)
    retried: list[str] = []
    with observe_retries(retried.append):
        await storage.write_bytes("small", b"x")  # no retry
        async with await storage.open_sink("s.vdi") as sink:
            await sink.write(memoryview(data))
            await sink.commit()
    assert busy.hits == 2
    assert retried == ["azure: stage block"] * 2  # one metric label, not one per block
    assert azurite.get(container, "backups/s.vdi") == data


async def test_a_lost_commit_answer_is_replayed_and_recognised_as_ours(
    make_storage: StorageFactory, azurite: Azurite, container: str, proxy: FaultProxy
) -> None:
    """The proxy forwards the block list, then cuts the answer: Azure committed, the
    sink never heard. The SDK's retry is refused (the blob exists); the blob carries
    the sink's token and size, so the commit stands instead of failing."""
    cut = proxy.add("cut", BLOCK_LIST, count=1, after_bytes=0)
    storage = make_storage(endpoint=through(proxy))
    data = os.urandom(2 * BLOCK + 1)
    sink = await storage.open_sink("s.vdi")
    await sink.write(memoryview(data))
    await sink.commit()
    assert cut.hits == 1
    assert azurite.get(container, "backups/s.vdi") == data
    await sink.abort()  # a no-op: committed
    assert azurite.get(container, "backups/s.vdi") == data


async def test_a_server_that_keeps_failing_is_one_line(
    make_storage: StorageFactory, azurite: Azurite, container: str, proxy: FaultProxy
) -> None:
    busy = proxy.add("error", STAGE, count=100, status=503, code="ServerBusy")
    storage = make_storage(endpoint=through(proxy), max_attempts=3)
    sink = await storage.open_sink("s.vdi", device="dev2")

    async def stage_one_block() -> None:
        await sink.write(memoryview(os.urandom(BLOCK)))
        await sink.flush()

    with pytest.raises(StorageError) as caught:
        await stage_one_block()
    assert busy.hits == 3  # the bound: max_attempts in all
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("stage block 1 failed: Azure ServerBusy (HTTP 503)")
    assert message.endswith(
        f"container '{container}', blob 'backups/s.vdi' "
        f"(device 'dev2', azure://devstoreaccount1/{container}/backups/s.vdi)"
    )
    await sink.abort()
    assert azurite.blobs(container, uncommitted=True) == []
