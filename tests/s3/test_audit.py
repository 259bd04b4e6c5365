"""``vdistream.catalog.audit``: debris no committed manifest references, on S3 (objects
and abandoned multipart uploads) and on the storages without uploads."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest

from tests.s3.conftest import TEST_PART_SIZE, MotoServer, StorageFactory
from vdistream.catalog import DeviceEntry, Manifest, write_manifest
from vdistream.catalog.audit import audit
from vdistream.storage import FileStorage, MemoryStorage, Storage


def manifest(backup_id: str, keys: list[str]) -> Manifest:
    return Manifest(
        backup_id=backup_id,
        engine="cmd",
        mode=None,
        source="test",
        started="2026-11-25T00:00:00Z",
        ended="2026-11-25T00:01:00Z",
        vdi={"device_count": len(keys)},
        devices=tuple(
            DeviceEntry(i, f"dev{i}", key, f"x://{key}", 1, "00") for i, key in enumerate(keys)
        ),
        versions={"vdistream": "test"},
    )


async def committed_backup(storage: Storage, backup_id: str, streams: int = 2) -> list[str]:
    """Streams then the manifest, the way a backup commits; returns every key."""
    keys = [f"{backup_id}/dev{i}.bak" for i in range(streams)]
    for key in keys:
        async with await storage.open_sink(key) as sink:
            await sink.write(memoryview(os.urandom(TEST_PART_SIZE + 10)))
            await sink.commit()
    await write_manifest(storage, manifest(backup_id, keys))
    return [*keys, f"{backup_id}/manifest.json"]


@pytest.mark.asyncio
async def test_s3_orphans_and_abandoned_uploads(
    make_storage: StorageFactory, moto_server: MotoServer, bucket: str
) -> None:
    storage = make_storage("site")
    kept = await committed_backup(storage, "b1")
    # a job that died after one stream: committed object, no manifest
    await storage.write_bytes("b2/dev0.bak", b"half a backup")
    # a job that died mid-stream: an upload never completed nor aborted
    sink = await storage.open_sink("b2/dev1.bak")
    await sink.write(memoryview(os.urandom(2 * TEST_PART_SIZE)))
    await sink.flush()
    assert sink.upload_id is not None
    # outside the prefix: none of this storage's business
    moto_server.client.put_object(Bucket=bucket, Key="other/x", Body=b"x")
    moto_server.client.create_multipart_upload(Bucket=bucket, Key="other/y")

    report = await audit(storage)
    assert report.backups == ("b1",)
    assert sorted(report.referenced) == sorted(kept)
    assert report.orphan_objects == ("b2/dev0.bak",)
    assert [(u.key, u.upload_id) for u in report.orphan_uploads] == [
        ("b2/dev1.bak", sink.upload_id)
    ]
    assert report.orphan_uploads[0].initiated is not None
    assert not report.clean
    assert sorted(await storage.list()) == sorted([*kept, "b2/dev0.bak"])  # report only

    cleaned = await audit(storage, clean=True)
    assert cleaned.removed_objects == ("b2/dev0.bak",)
    assert [u.upload_id for u in cleaned.aborted_uploads] == [sink.upload_id]
    assert cleaned.clean
    assert sorted(await storage.list()) == sorted(kept)
    assert moto_server.uploads(bucket, "site/") == []
    assert [key for key, _ in moto_server.uploads(bucket)] == ["other/y"]
    assert "other/x" in moto_server.keys(bucket)
    again = await audit(storage)
    assert again.clean
    assert again.orphan_objects == ()
    await sink.abort()  # the abandoned sink's abort finds its upload gone: quiet


@pytest.mark.asyncio
async def test_min_age_protects_running_jobs(make_storage: StorageFactory) -> None:
    """Objects younger than ``min_age`` are kept. (Uploads are judged by their
    ``Initiated`` time the same way; moto 5.2 reports a fixed date in 2010 for every
    upload, so that half cannot be shown against it.)"""
    storage = make_storage("young")
    await storage.write_bytes("job/dev0.bak", b"being written right now")
    report = await audit(storage, clean=True, min_age=datetime.timedelta(hours=1))
    assert report.orphan_objects == ()
    assert report.too_young == ("job/dev0.bak",)
    assert not report.clean  # debris may remain
    assert await storage.list() == ["job/dev0.bak"]
    old_enough = await audit(storage, min_age=datetime.timedelta(0))
    assert old_enough.orphan_objects == ("job/dev0.bak",)
    unknown_age = await audit(MemoryStorage(), min_age=datetime.timedelta(0))
    assert unknown_age.clean


@pytest.mark.asyncio
async def test_unreadable_manifest_protects_its_backup() -> None:
    storage = MemoryStorage()
    kept = await committed_backup(storage, "good", streams=1)
    await storage.write_bytes("bad/dev0.bak", b"stream of a backup we cannot read")
    await storage.write_bytes("bad/manifest.json", b"{not json")
    await storage.write_bytes("stray", b"orphan")
    report = await audit(storage, clean=True)
    assert report.unverifiable == ("bad/dev0.bak", "bad/manifest.json")
    assert len(report.problems) == 1
    assert "not valid JSON" in report.problems[0]
    assert report.removed_objects == ("stray",)
    assert sorted(await storage.list()) == sorted([*kept, "bad/dev0.bak", "bad/manifest.json"])


@pytest.mark.asyncio
async def test_missing_streams_are_reported() -> None:
    storage = MemoryStorage()
    keys = await committed_backup(storage, "b", streams=2)
    await storage.delete(keys[0])
    report = await audit(storage)
    assert report.missing == (keys[0],)
    assert report.clean


@pytest.mark.asyncio
async def test_file_storage_objects_and_temporaries(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "store")
    kept = await committed_backup(storage, "b1", streams=1)
    await storage.write_bytes("b2/dev0.bak", b"orphan")
    left = await storage.open_sink("b2/dev1.bak")  # a killed process leaves its temp
    await left.write(memoryview(b"partial"))
    report = await audit(storage)
    assert report.orphan_objects == ("b2/dev0.bak",)
    # temporaries live beside their key now, and are named relative to the storage
    assert report.temporaries == (f"b2/{left.temp_path.name}",)
    assert report.orphan_uploads == ()
    assert report.debris_left
    cleaned = await audit(storage, clean=True)
    assert cleaned.removed_temporaries == (f"b2/{left.temp_path.name}",)
    assert cleaned.removed_directories == ("b2",)
    assert not cleaned.debris_left
    assert cleaned.clean
    assert not left.temp_path.exists()
    assert sorted(await storage.list()) == sorted(kept)
    await left.abort()  # its file is gone already: abort is quiet
