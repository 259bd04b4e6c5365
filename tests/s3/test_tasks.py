"""The S3 package's structure: retries reach an observer through ``observe_retries``;
part uploads and read-ahead live in a task group the sink or source owns (its
``async with`` block), else the storage's (``background()``, how a job runs), else each
call's; and nothing in the package starts a bare task."""

from __future__ import annotations

import collections
import logging
import os
import pathlib
import re
import subprocess
import sys

import anyio
import pytest

import vdistream.storage.s3
from tests.s3.conftest import TEST_PART_SIZE, MotoServer, StorageFactory
from tests.s3.proxy import FaultProxy
from tests.s3.test_faults import CREATE, PART, assert_all_hit, nth_part, upload
from vdistream.storage.s3 import observe_retries

P = TEST_PART_SIZE


@pytest.mark.asyncio
async def test_observe_retries_counts_real_retries(
    faulty: StorageFactory,
    proxy: FaultProxy,
    moto_server: MotoServer,
    bucket: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy.add("error", CREATE, status=500, code="InternalError")
    proxy.add("error", nth_part(2), count=2)  # 503 SlowDown
    storage = faulty()
    data = os.urandom(3 * P + 5)
    seen: list[str] = []
    with caplog.at_level(logging.WARNING, "vdistream.storage"), observe_retries(seen.append):
        await upload(storage, "observed", data)
    assert_all_hit(proxy)
    # the part uploads run in the sink's task group and still report to the observer
    # the observer (a metric's label) gets the operation without its part number
    assert collections.Counter(seen) == {"start upload": 1, "upload part": 2}
    retries = [record for record in caplog.records if record.msg == "s3_request_retry"]
    assert sorted(getattr(record, "operation", None) for record in retries) == [
        "start upload",
        "upload part 2",
        "upload part 2",
    ]
    assert moto_server.get(bucket, "backups/observed") == data


@pytest.mark.asyncio
async def test_retries_outside_observe_retries_call_nothing(
    faulty: StorageFactory, proxy: FaultProxy
) -> None:
    seen: list[str] = []
    with observe_retries(seen.append):
        pass
    proxy.add("error", PART, count=1)
    await upload(faulty(), "unobserved", os.urandom(2 * P))
    assert_all_hit(proxy)
    assert seen == []


@pytest.mark.asyncio
async def test_without_async_with_each_write_waits_for_its_parts(
    make_storage: StorageFactory, moto_server: MotoServer, bucket: str
) -> None:
    storage = make_storage()
    data = os.urandom(4 * P + 9)
    sink = await storage.open_sink("per-call")
    await sink.write(memoryview(data)[: 3 * P + 1])
    assert sink.parts_in_flight == 0  # the call's own task group has ended
    assert [part.size for part in sink.parts] == [P] * 3
    await sink.write(memoryview(data)[3 * P + 1 :])
    await sink.commit()
    assert [part.size for part in sink.parts] == [P] * 4 + [9]
    assert moto_server.get(bucket, "backups/per-call") == data


@pytest.mark.asyncio
async def test_in_the_storage_background_parts_overlap_the_next_write(
    faulty: StorageFactory, proxy: FaultProxy, moto_server: MotoServer, bucket: str
) -> None:
    """How a job's devices write (``coordinator.opened_storage``): no ``async with`` on
    the sink, yet its uploads outlive each ``write``, in the storage's group."""
    proxy.add("delay", PART, seconds=0.3, count=10)
    storage = faulty()
    data = os.urandom(4 * P + 9)
    async with storage.background():
        assert storage.background_group is not None
        sink = await storage.open_sink("overlap")
        await sink.write(memoryview(data)[: 2 * P + 1])
        assert sink.parts_in_flight == 2  # still uploading after write returned
        await sink.write(memoryview(data)[2 * P + 1 :])
        await sink.commit()
        assert sink.parts_in_flight == 0
    assert storage.background_group is None
    assert moto_server.get(bucket, "backups/overlap") == data


@pytest.mark.asyncio
async def test_an_error_in_the_storage_background_comes_out_as_itself(
    make_storage: StorageFactory,
) -> None:
    storage = make_storage()
    with pytest.raises(ValueError, match=r"^the body's own$"):
        async with storage.background():
            raise ValueError("the body's own")


@pytest.mark.asyncio
async def test_cancelled_owner_aborts_its_parts_in_flight(
    faulty: StorageFactory, proxy: FaultProxy, moto_server: MotoServer, bucket: str
) -> None:
    proxy.add("delay", PART, seconds=0.3, count=10)
    storage = faulty()
    with anyio.CancelScope() as scope:
        async with await storage.open_sink("cancelled") as sink:
            await sink.write(memoryview(os.urandom(2 * P + 1)))
            assert sink.parts_in_flight == 2  # still uploading after write returned
            scope.cancel()
            await anyio.sleep(1)  # cancelled here; the exit aborts the sink
    assert scope.cancelled_caught
    assert sink.parts_in_flight == 0
    assert moto_server.keys(bucket) == []
    assert moto_server.uploads(bucket) == []


@pytest.mark.asyncio
async def test_source_read_ahead_ends_with_its_owner(make_storage: StorageFactory) -> None:
    storage = make_storage(read_ahead=3)
    data = os.urandom(6 * P)
    await storage.write_bytes("ahead", data)
    buffer = memoryview(bytearray(10))
    async with await storage.open_source("ahead") as source:
        assert await source.readinto(buffer) == 10
        calls = list(source._chunks.values())
        assert len(calls) == 4  # the current range and three ahead
    assert all(call.done for call in calls)  # the group waited for every range
    unowned = await storage.open_source("ahead")
    assert await unowned.readinto(buffer) == 10
    assert list(unowned._chunks) == [0]  # no read-ahead beyond what the call needs
    await unowned.close()
    assert bytes(buffer) == data[:10]


def test_no_bare_tasks_in_the_package() -> None:
    """Every task lives in a task group entered with ``async with`` (the guide's rule)."""
    package = pathlib.Path(vdistream.storage.s3.__file__).parent
    banned = re.compile(r"create_task\b|ensure_future|asyncio\.wait\b|\.__aenter__\(")
    found = [
        f"{path.name}:{number}: {line.strip()}"
        for path in sorted(package.glob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if banned.search(line)
    ]
    assert found == []


def test_observe_retries_loads_no_aws_library() -> None:
    """The daemon observes retries without loading aiobotocore where no S3 is used."""
    code = (
        "import sys; from vdistream.storage.s3 import observe_retries;"
        "assert not {'aiobotocore', 'botocore', 'aiohttp'} & set(sys.modules);"
        "from vdistream.storage.s3 import S3Storage;"
        "assert 'aiobotocore' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.asyncio
async def test_jobs_sharing_one_storage_each_keep_their_own_background(
    make_storage: StorageFactory, moto_server: MotoServer, bucket: str
) -> None:
    """Job B's block ends while job A, on the same storage, still writes: A's parts run
    in A's block, never in B's ended one."""
    storage = make_storage()
    b_in, a_opened, b_out = anyio.Event(), anyio.Event(), anyio.Event()
    data = os.urandom(3 * P)

    async def job_a() -> None:
        async with storage.background():
            mine = storage.background_group
            await b_in.wait()
            sink = await storage.open_sink("a")
            assert storage.background_group is mine  # not B's, entered later
            a_opened.set()
            await b_out.wait()
            await sink.write(memoryview(data))
            await sink.commit()

    async def job_b() -> None:
        async with storage.background():
            b_in.set()
            await a_opened.wait()
        b_out.set()

    with anyio.fail_after(30):
        async with anyio.create_task_group() as group:
            group.start_soon(job_a)
            group.start_soon(job_b)
    assert moto_server.get(bucket, "backups/a") == data


@pytest.mark.asyncio
async def test_a_nested_background_gives_the_outer_one_back(make_storage: StorageFactory) -> None:
    storage = make_storage()
    async with storage.background():
        outer = storage.background_group
        async with storage.background():
            assert storage.background_group not in (None, outer)
        assert storage.background_group is outer
