"""vdistream <-> fault proxy <-> moto: transient faults are retried and the bytes come
out identical; persistent faults fail with a StorageError and leave nothing behind (no
object, no open multipart upload)."""

from __future__ import annotations

import os

import anyio
import pytest

from tests.s3.conftest import TEST_PART_SIZE, MotoServer, StorageFactory
from tests.s3.proxy import FaultProxy
from vdistream.errors import StorageError
from vdistream.storage.s3 import S3Storage

P = TEST_PART_SIZE
PART = r"^PUT /\S*[?&]partNumber="
CREATE = r"^POST /\S*[?&]uploads"
COMPLETE = r"^POST /\S*[?&]uploadId="


def nth_part(number: int) -> str:
    return rf"{PART}{number}(&|$)"


async def upload(storage: S3Storage, key: str, data: bytes, device: str | None = None) -> None:
    async with await storage.open_sink(key, device=device) as sink:
        await sink.write(memoryview(data))
        await sink.commit()


def assert_all_hit(proxy: FaultProxy) -> None:
    for fault in proxy.faults:
        assert fault.hits == fault.count, (fault, proxy.requests)


@pytest.mark.asyncio
async def test_multipart_upload_survives_transient_faults(
    faulty: StorageFactory, proxy: FaultProxy, moto_server: MotoServer, bucket: str
) -> None:
    proxy.latency = 0.002
    proxy.add("error", CREATE, status=500, code="InternalError")
    proxy.add("error", PART, count=2)  # 503 SlowDown
    proxy.add("reset", nth_part(3))
    proxy.add("reset", COMPLETE)  # dropped before it reached S3
    proxy.add("cut", COMPLETE)  # reached S3, the answer was lost: the retry finds it done
    proxy.add("error", r"^HEAD ", status=503, code="ServiceUnavailable")
    storage = faulty(max_attempts=5)
    data = os.urandom(6 * P + 1234)
    async with await storage.open_sink("db/dev0", device="dev0") as sink:
        for start in range(0, len(data), 50_000):
            await sink.write(memoryview(data)[start : start + 50_000])
        await sink.commit()
    assert_all_hit(proxy)
    assert moto_server.get(bucket, "backups/db/dev0") == data
    assert moto_server.uploads(bucket) == []


@pytest.mark.asyncio
async def test_conditional_put_replayed_after_a_lost_answer_is_ours(
    faulty: StorageFactory, proxy: FaultProxy, moto_server: MotoServer, bucket: str
) -> None:
    """The put landed, its 200 was lost; the retry gets 412 and recognises its bytes."""
    proxy.add("cut", r"^PUT /[^ ?]*/backups/manifest\.json$", after_bytes=5)
    storage = faulty()
    await storage.write_bytes("manifest.json", b'{"devices": []}')
    assert_all_hit(proxy)
    assert moto_server.get(bucket, "backups/manifest.json") == b'{"devices": []}'


@pytest.mark.asyncio
async def test_ranged_reads_survive_faults(
    make_storage: StorageFactory, faulty: StorageFactory, proxy: FaultProxy
) -> None:
    data = os.urandom(9 * P + 5)
    await make_storage().write_bytes("obj", data)
    proxy.add("error", r"^GET ", count=2)
    proxy.add("cut", r"^GET ", after_bytes=1000)  # mid-body
    proxy.add("stall", r"^GET ", seconds=0.2)  # then reset
    proxy.add("reset", r"^GET ")
    proxy.add("error", r"^GET ", status=500, code="InternalError")
    storage = faulty(read_ahead=2)
    got = bytearray()
    buffer = memoryview(bytearray(50_000))
    async with await storage.open_source("obj") as source:
        while count := await source.readinto(buffer):
            got += buffer[:count]
    assert_all_hit(proxy)
    assert bytes(got) == data


@pytest.mark.asyncio
async def test_stall_beyond_the_read_timeout_is_retried(
    faulty: StorageFactory, proxy: FaultProxy, moto_server: MotoServer, bucket: str
) -> None:
    proxy.add("stall", nth_part(2), seconds=3.0)
    storage = faulty(read_timeout=0.5)
    data = os.urandom(3 * P)
    await upload(storage, "slow", data)
    assert_all_hit(proxy)
    assert moto_server.get(bucket, "backups/slow") == data


@pytest.mark.asyncio
async def test_bounded_parts_in_flight_under_latency(
    faulty: StorageFactory, proxy: FaultProxy, moto_server: MotoServer, bucket: str
) -> None:
    proxy.latency = 0.03
    storage = faulty(max_parts_in_flight=2)
    data = os.urandom(8 * P)
    seen: list[int] = []
    async with await storage.open_sink("bounded") as sink:

        async def sample() -> None:
            while True:
                seen.append(sink.parts_in_flight)
                await anyio.sleep(0.005)

        async with anyio.create_task_group() as sampler:
            sampler.start_soon(sample)
            await sink.write(memoryview(data))  # one call, eight parts
            await sink.commit()
            sampler.cancel_scope.cancel()
    assert max(seen) == 2
    assert moto_server.get(bucket, "backups/bounded") == data


@pytest.mark.asyncio
async def test_a_part_that_keeps_failing_fails_cleanly(
    faulty: StorageFactory, proxy: FaultProxy, moto_server: MotoServer, bucket: str
) -> None:
    proxy.add("error", nth_part(2), count=10**6)
    storage = faulty(max_attempts=3)
    with pytest.raises(StorageError) as caught:
        await upload(storage, "doomed", os.urandom(3 * P), device="dev4")
    message = str(caught.value)
    for part in ("SlowDown", "after 3 attempts", "backups/doomed", bucket, "dev4"):
        assert part in message
    assert moto_server.keys(bucket) == []
    assert moto_server.uploads(bucket) == []


@pytest.mark.asyncio
async def test_a_commit_that_keeps_failing_fails_cleanly(
    faulty: StorageFactory, proxy: FaultProxy, moto_server: MotoServer, bucket: str
) -> None:
    proxy.add("reset", COMPLETE, count=10**6)
    storage = faulty(max_attempts=2)
    with pytest.raises(StorageError, match=r"complete upload.*backups/never"):
        await upload(storage, "never", os.urandom(2 * P + 1))
    assert moto_server.keys(bucket) == []
    assert moto_server.uploads(bucket) == []


@pytest.mark.asyncio
async def test_a_read_that_keeps_failing_fails_cleanly(
    make_storage: StorageFactory, faulty: StorageFactory, proxy: FaultProxy
) -> None:
    await make_storage().write_bytes("unreadable", os.urandom(2 * P))
    proxy.add("reset", r"^GET ", count=10**6)
    storage = faulty(max_attempts=2)
    source = await storage.open_source("unreadable")
    with pytest.raises(StorageError, match="backups/unreadable"):
        await source.readinto(memoryview(bytearray(P)))
    await source.close()
    assert not source._chunks  # no range left in flight
