"""Multipart uploads against moto: parts, growth, checksums, abort, conditional writes."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os

import pytest

from tests.s3.conftest import TEST_PART_SIZE, MotoServer, StorageFactory
from vdistream.catalog import CatalogError, DeviceEntry, Manifest, write_manifest
from vdistream.errors import StorageError, StorageExistsError, StorageIntegrityError
from vdistream.storage.s3 import part_sizes

P = TEST_PART_SIZE


async def write_uneven(sink: object, data: bytes, sizes: tuple[int, ...]) -> int:
    """Write ``data`` in pieces cycling through ``sizes``; the most parts in flight."""
    from vdistream.storage.s3 import S3Sink

    assert isinstance(sink, S3Sink)
    most, view, start = 0, memoryview(data), 0
    for size in itertools.cycle(sizes):
        if start >= len(data):
            return most
        await sink.write(view[start : start + size])
        most = max(most, sink.parts_in_flight)
        start += size
    return most


@pytest.mark.asyncio
async def test_stream_of_several_parts(
    make_storage: StorageFactory, moto_server: MotoServer, bucket: str
) -> None:
    storage = make_storage()
    data = os.urandom(5 * P + 12_345)
    # Inside ``async with`` the sink's task group outlives each write: parts overlap.
    async with await storage.open_sink("db/dev0", device="dev0") as sink:
        most = await write_uneven(sink, data, (1, 100_000, 7, P, 30_000))
        assert 1 <= most <= 2  # bounded: at most max_parts_in_flight uploading
        assert sink.upload_id is not None
        assert moto_server.uploads(bucket) == [("backups/db/dev0", sink.upload_id)]
        assert await storage.list() == []  # an open upload is no object
        await sink.flush()
        assert sink.parts_in_flight == 0
        assert [part.size for part in sink.parts] == [P] * 5  # the sixth is still filling
        await sink.commit()
    sizes = [part.size for part in sink.parts]
    assert sizes == part_sizes(len(data), initial=P) == [P] * 5 + [12_345]
    offsets = list(itertools.accumulate(sizes, initial=0))
    assert sink.part_checksums == tuple(
        hashlib.sha256(data[a:b]).hexdigest() for a, b in itertools.pairwise(offsets)
    )
    assert moto_server.get(bucket, "backups/db/dev0") == data
    assert moto_server.uploads(bucket) == []
    assert await storage.stat("db/dev0") == len(data)
    assert await storage.read_bytes("db/dev0") == data


@pytest.mark.asyncio
async def test_part_size_grows_along_the_schedule(
    make_storage: StorageFactory, moto_server: MotoServer, bucket: str
) -> None:
    """Doubling every 2 parts here (every 1,000 in production): 1, 1, 2, 2, 4, rest."""
    storage = make_storage(part_growth_interval=2, max_parts_in_flight=3)
    data = os.urandom(P * (1 + 1 + 2 + 2 + 4) + 999)
    sink = await storage.open_sink("grow")
    await write_uneven(sink, data, (50_000, 3 * P + 1))
    await sink.commit()
    expected = part_sizes(len(data), initial=P, growth_interval=2)
    assert expected == [P, P, 2 * P, 2 * P, 4 * P, 999]
    assert [part.size for part in sink.parts] == expected
    assert moto_server.get(bucket, "backups/grow") == data


@pytest.mark.asyncio
async def test_expected_size_picks_a_larger_first_part(make_storage: StorageFactory) -> None:
    storage = make_storage()
    sink = await storage.open_sink("hinted", expected_size=P * 2000 * 3)
    data = os.urandom(5 * P)
    await sink.write(memoryview(data))
    await sink.commit()
    assert [part.size for part in sink.parts] == [4 * P, P]
    assert await storage.read_bytes("hinted") == data


@pytest.mark.asyncio
@pytest.mark.parametrize("size", [3 * P + 5, 100])
async def test_sha256_sent_to_s3_when_asked(make_storage: StorageFactory, size: int) -> None:
    """``send_checksums``: S3 gets ChecksumSHA256 for every part (moto accepts it)."""
    storage = make_storage(send_checksums=True)
    data = os.urandom(size)
    sink = await storage.open_sink("checked")
    await sink.write(memoryview(data))
    await sink.commit()
    assert await storage.read_bytes("checked") == data
    if size < P:
        assert sink.part_checksums == (hashlib.sha256(data).hexdigest(),)
    else:
        assert len(sink.part_checksums) == 4


@pytest.mark.asyncio
async def test_abort_leaves_no_object_and_no_upload(
    make_storage: StorageFactory, moto_server: MotoServer, bucket: str
) -> None:
    storage = make_storage()
    sink = await storage.open_sink("aborted", device="dev1")
    await sink.write(memoryview(os.urandom(4 * P + 10)))  # parts may still be in flight
    upload_id = sink.upload_id
    assert upload_id is not None
    assert moto_server.uploads(bucket) == [("backups/aborted", upload_id)]
    await sink.abort()
    assert moto_server.uploads(bucket) == []
    assert moto_server.keys(bucket) == []
    await sink.abort()  # idempotent
    with pytest.raises(StorageError, match="dev1"):
        await sink.write(memoryview(b"late"))


@pytest.mark.asyncio
async def test_abort_of_an_upload_already_gone_is_quiet(
    make_storage: StorageFactory, moto_server: MotoServer, bucket: str
) -> None:
    storage = make_storage()
    sink = await storage.open_sink("gone")
    await sink.write(memoryview(os.urandom(2 * P)))
    await sink.flush()
    assert sink.upload_id is not None
    moto_server.client.abort_multipart_upload(
        Bucket=bucket, Key="backups/gone", UploadId=sink.upload_id
    )
    await sink.abort()
    assert moto_server.uploads(bucket) == []


@pytest.mark.asyncio
async def test_upload_removed_behind_our_back_fails_commit_cleanly(
    make_storage: StorageFactory, moto_server: MotoServer, bucket: str
) -> None:
    storage = make_storage()
    sink = await storage.open_sink("vanished")
    await sink.write(memoryview(os.urandom(2 * P)))  # two full parts, nothing filling
    await sink.flush()
    assert sink.upload_id is not None
    moto_server.client.abort_multipart_upload(
        Bucket=bucket, Key="backups/vanished", UploadId=sink.upload_id
    )
    # S3 says NoSuchUpload; moto 5.2 answers 500 (retried, then given up): either way
    # a StorageError naming the key, and nothing published.
    with pytest.raises(StorageError, match="backups/vanished"):
        await sink.commit()
    await sink.abort()
    assert moto_server.keys(bucket) == []
    assert moto_server.uploads(bucket) == []


@pytest.mark.asyncio
async def test_manifest_put_is_conditional(make_storage: StorageFactory) -> None:
    """A replayed or concurrent job cannot overwrite a committed manifest."""
    storage = make_storage()
    manifest = Manifest(
        backup_id="b1",
        engine="cmd",
        mode=None,
        source="test",
        started="2026-11-25T00:00:00Z",
        ended="2026-11-25T00:01:00Z",
        vdi={"device_count": 1},
        devices=(DeviceEntry(0, "dev0", "b1/dev0", "s3://x", 3, "00"),),
        versions={"vdistream": "test"},
    )
    await write_manifest(storage, manifest)
    original = await storage.read_bytes("b1/manifest.json")
    with pytest.raises(StorageExistsError, match="PreconditionFailed"):
        await storage.write_bytes("b1/manifest.json", b'{"forged": true}')
    replayed = dataclasses.replace(manifest, ended="2026-11-25T00:02:00Z")
    with pytest.raises(CatalogError, match="already exists"):
        await write_manifest(storage, replayed)
    assert await storage.read_bytes("b1/manifest.json") == original
    await storage.write_bytes("b1/manifest.json", b"replaced", overwrite=True)
    assert await storage.read_bytes("b1/manifest.json") == b"replaced"


@pytest.mark.asyncio
async def test_multipart_commit_never_overwrites(
    make_storage: StorageFactory, moto_server: MotoServer, bucket: str
) -> None:
    storage = make_storage()
    data = os.urandom(3 * P + 77)
    sink = await storage.open_sink("key")
    await sink.write(memoryview(data))
    await storage.write_bytes("key", b"first")
    with pytest.raises(StorageExistsError, match="backups/key"):
        await sink.commit()
    assert await storage.read_bytes("key") == b"first"
    assert [key for key, _ in moto_server.uploads(bucket)] == ["backups/key"]  # kept
    await storage.delete("key")
    await sink.commit()  # refused, not failed: commits once the key is free
    assert await storage.read_bytes("key") == data
    assert moto_server.uploads(bucket) == []

    loser = await storage.open_sink("key")
    await loser.write(memoryview(os.urandom(2 * P)))
    with pytest.raises(StorageExistsError):
        await loser.commit()
    await loser.abort()
    assert moto_server.uploads(bucket) == []
    assert await storage.read_bytes("key") == data


@pytest.mark.asyncio
async def test_reading_an_object_replaced_midway_fails(make_storage: StorageFactory) -> None:
    storage = make_storage(read_ahead=0)
    await storage.write_bytes("moving", os.urandom(3 * P))
    buffer = memoryview(bytearray(P))
    async with await storage.open_source("moving") as source:
        assert await source.readinto(buffer) == P
        await storage.write_bytes("moving", os.urandom(3 * P), overwrite=True)
        with pytest.raises(StorageIntegrityError, match="PreconditionFailed"):
            await source.readinto(buffer)


@pytest.mark.asyncio
async def test_read_ahead_and_positions(make_storage: StorageFactory) -> None:
    storage = make_storage(read_ahead=2)
    data = os.urandom(7 * P + 3)
    await storage.write_bytes("ranged", data)
    async with await storage.open_source("ranged") as source:
        buffer = memoryview(bytearray(P // 3))
        count = await source.readinto(buffer)
        assert bytes(buffer[:count]) == data[:count]
        assert len(source._chunks) == 3  # the current range and two ahead
        count = await source.readinto(buffer, position=5 * P + 11)
        assert bytes(buffer[:count]) == data[5 * P + 11 : 5 * P + 11 + count]
        assert len(source._chunks) == 1  # a jump drops the read-ahead
        rest = bytearray()
        big = memoryview(bytearray(3 * P))
        while count := await source.readinto(big):
            rest += big[:count]
        assert bytes(rest) == data[5 * P + 11 + P // 3 :]


@pytest.mark.asyncio
async def test_a_byte_identical_object_counts_as_our_replayed_write(
    make_storage: StorageFactory,
) -> None:
    """What a replayed conditional put finds after its first answer was lost (our retry,
    or aiohttp resending an idempotent PUT on its own) is an object with exactly its
    bytes: that is success, not a conflict. Different bytes stay a conflict."""
    storage = make_storage()
    await storage.write_bytes("m", b"same bytes")
    await storage.write_bytes("m", b"same bytes")
    with pytest.raises(StorageExistsError):
        await storage.write_bytes("m", b"other bytes")
    assert await storage.read_bytes("m") == b"same bytes"


@pytest.mark.asyncio
async def test_large_parts_are_hashed_in_a_worker_thread(make_storage: StorageFactory) -> None:
    storage = make_storage(part_size=2 << 20)
    data = os.urandom((4 << 20) + 3)
    sink = await storage.open_sink("large")
    await sink.write(memoryview(data))
    await sink.commit()
    assert [part.size for part in sink.parts] == [2 << 20, 2 << 20, 3]
    assert sink.part_checksums[0] == hashlib.sha256(data[: 2 << 20]).hexdigest()
    await storage.write_bytes("large-put", data[: 3 << 19])
    assert await storage.read_bytes("large") == data
