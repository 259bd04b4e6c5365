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
from vdistream.errors import StorageError, StorageExistsError, StorageNotFoundError
from vdistream.storage.base import OrphanUploadsError
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


async def test_a_put_whose_answers_are_all_lost_is_taken_back(
    make_storage: StorageFactory, azurite: Azurite, container: str, proxy: FaultProxy
) -> None:
    """Every attempt reaches Azure and every answer is cut (a connection reset after
    the request went out, which azure-core reports as ``ServiceRequestError``): the put
    may have landed, so the failed write removes its own blob. A manifest left there
    would be a backup the job reported failed (and whose streams it deleted)."""
    cut = proxy.add("cut", r"^PUT \S+/manifest\.json", count=100, after_bytes=0)
    storage = make_storage(endpoint=through(proxy), max_attempts=2)
    with pytest.raises(StorageError, match=r"^commit \(put blob\) failed: ServiceRequestError"):
        await storage.write_bytes("b1/manifest.json", b'{"a manifest": 1}')
    assert cut.hits >= 2
    assert azurite.blobs(container) == []


async def test_a_block_list_whose_answers_are_all_lost_is_taken_back_by_abort(
    make_storage: StorageFactory, azurite: Azurite, container: str, proxy: FaultProxy
) -> None:
    storage = make_storage(endpoint=through(proxy), max_attempts=2)
    sink = await storage.open_sink("s.vdi")
    await sink.write(memoryview(os.urandom(2 * BLOCK + 1)))
    cut = proxy.add("cut", BLOCK_LIST, count=100, after_bytes=0)
    with pytest.raises(StorageError, match=r"^commit \(put block list\) failed: ServiceReq"):
        await sink.commit()
    assert cut.hits >= 2
    assert azurite.blobs(container) == ["backups/s.vdi"]  # it did land
    cut.count = cut.hits  # the network is back for the abort
    await sink.abort()
    assert azurite.blobs(container) == []
    assert azurite.blobs(container, uncommitted=True) == []


async def test_a_refusal_that_cannot_be_checked_is_not_taken_for_someone_elses_blob(
    make_storage: StorageFactory, azurite: Azurite, container: str, proxy: FaultProxy
) -> None:
    """The block list lands, its answer is lost, the SDK's replay is refused (the blob
    exists: ours) and the check of whose it is fails too. The commit must not report
    "exists" (a foreign blob, kept by abort) but fail; abort then removes our blob."""
    storage = make_storage(endpoint=through(proxy), max_attempts=2)
    sink = await storage.open_sink("s.vdi")
    await sink.write(memoryview(os.urandom(2 * BLOCK + 1)))
    cut = proxy.add("cut", BLOCK_LIST, count=1, after_bytes=0)
    heads = proxy.add("reset", r"^HEAD \S+/s\.vdi", count=100)
    with pytest.raises(StorageError) as caught:
        await sink.commit()
    assert not isinstance(caught.value, StorageExistsError), caught.value
    assert "check ownership failed" in str(caught.value)
    assert (cut.hits, heads.hits >= 2) == (1, True)
    assert azurite.blobs(container) == ["backups/s.vdi"]
    heads.count = heads.hits
    await sink.abort()
    assert azurite.blobs(container) == []
    assert azurite.blobs(container, uncommitted=True) == []


async def test_a_delete_whose_answer_is_lost_succeeds(
    make_storage: StorageFactory, azurite: Azurite, container: str, proxy: FaultProxy
) -> None:
    """The SDK replays the delete; the replay's 404 is the first attempt's work."""
    storage = make_storage(endpoint=through(proxy))
    await storage.write_bytes("b1/dev0.bak", b"stream")
    cut = proxy.add("cut", r"^DELETE \S+/dev0\.bak", count=1, after_bytes=0)
    await storage.delete("b1/dev0.bak")
    assert cut.hits == 1
    assert azurite.blobs(container) == []
    with pytest.raises(StorageNotFoundError):
        await storage.delete("b1/dev0.bak")  # a blob that is not there still is an error


async def test_a_put_refusal_that_cannot_be_checked_is_no_exists_error(
    make_storage: StorageFactory, azurite: Azurite, container: str, proxy: FaultProxy
) -> None:
    """``write_bytes``' twin of the test above (a manifest): the put lands, its answer is
    lost, the replay is refused and nothing can be checked, not even to take it back.
    Not "already exists" (which would make the job keep the blob): what is left is named,
    with the command that removes it."""
    storage = make_storage(endpoint=through(proxy), max_attempts=2)
    cut = proxy.add("cut", r"^PUT \S+/manifest\.json", count=1, after_bytes=0)
    proxy.add("reset", r"^HEAD \S+/manifest\.json", count=100)
    with pytest.raises(OrphanUploadsError) as caught:
        await storage.write_bytes("b1/manifest.json", b"{}")
    assert cut.hits == 1
    assert "object b1/manifest.json; run `vdistream storage audit --clean azure://" in str(
        caught.value
    )
