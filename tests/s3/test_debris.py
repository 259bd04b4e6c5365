"""S3: owner marks (``in_progress``), the sweep of dead owners' debris, and ``probe``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.s3.conftest import TEST_PART_SIZE, MotoServer, StorageFactory
from vdistream.catalog.audit import audit
from vdistream.ownership import owner_record
from vdistream.storage import BackupInProgressError, StorageProbeError
from vdistream.storage.s3 import MARK_NAME

pytestmark = pytest.mark.asyncio


def dead_owner() -> dict[str, object]:
    """The owner record of a process of this host that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = owner_record(child.pid)
    finally:
        child.kill()
        child.wait()
    assert record["start_time"] is not None
    return record


def put_mark(moto: MotoServer, bucket: str, backup_id: str, record: dict[str, object]) -> str:
    key = f"backups/{backup_id}/{MARK_NAME}"
    body = json.dumps({**record, "backup_id": backup_id, "started": "2026-01-01T00:00:00+00:00"})
    moto.client.put_object(Bucket=bucket, Key=key, Body=body.encode())
    return key


async def test_a_dead_owners_debris_is_swept(
    make_storage: StorageFactory, moto_server: MotoServer, bucket: str
) -> None:
    storage = make_storage()
    put_mark(moto_server, bucket, "dead", dead_owner())
    await storage.write_bytes("dead/stream-01-of-02.vdi", b"a stream without a manifest")
    upload = moto_server.client.create_multipart_upload(
        Bucket=bucket, Key="backups/dead/stream-02-of-02.vdi"
    )["UploadId"]
    # a dead owner's committed backup: only its mark goes
    put_mark(moto_server, bucket, "done", dead_owner())
    await storage.write_bytes("done/stream-01-of-01.vdi", b"stream")
    await storage.write_bytes("done/manifest.json", b"{}")

    removed = await storage.sweep()

    assert sorted(removed) == sorted(
        [
            f"upload dead/stream-02-of-02.vdi {upload}",
            "dead/stream-01-of-02.vdi",
            f"dead/{MARK_NAME}",
            f"done/{MARK_NAME}",
        ]
    )
    assert sorted(moto_server.keys(bucket)) == [
        "backups/done/manifest.json",
        "backups/done/stream-01-of-01.vdi",
    ]
    assert moto_server.uploads(bucket) == []


async def test_live_and_foreign_marks_are_kept(
    make_storage: StorageFactory, moto_server: MotoServer, bucket: str
) -> None:
    storage = make_storage()
    foreign = {**owner_record(), "host": "another-host.example", "pid": 1}
    put_mark(moto_server, bucket, "foreign", foreign)
    await storage.write_bytes("foreign/stream-01-of-01.vdi", b"theirs")
    async with storage.in_progress("live"):
        assert f"backups/live/{MARK_NAME}" in moto_server.keys(bucket)
        mark = json.loads(moto_server.get(bucket, f"backups/live/{MARK_NAME}"))
        assert mark["pid"] == owner_record()["pid"]
        assert mark["backup_id"] == "live"
        assert "started" in mark
        sink = await storage.open_sink("live/stream-01-of-01.vdi")
        await sink.write(memoryview(bytes(2 * TEST_PART_SIZE)))
        await sink.flush()
        assert await storage.list() == ["foreign/stream-01-of-01.vdi"]  # marks are no objects

        assert await storage.sweep() == []

        assert len(moto_server.uploads(bucket)) == 1
        with pytest.raises(BackupInProgressError, match=r"backup live is being written"):
            async with make_storage().in_progress("live"):
                pass
        await sink.abort()
    assert f"backups/live/{MARK_NAME}" not in moto_server.keys(bucket)  # removed at exit
    assert f"backups/foreign/{MARK_NAME}" in moto_server.keys(bucket)
    with pytest.raises(BackupInProgressError, match=r"another-host\.example, pid 1"):
        async with storage.in_progress("foreign"):
            pass


async def test_a_dead_owners_mark_is_taken_over(
    make_storage: StorageFactory, moto_server: MotoServer, bucket: str
) -> None:
    put_mark(moto_server, bucket, "again", dead_owner())
    storage = make_storage()
    async with storage.in_progress("again"):
        mark = json.loads(moto_server.get(bucket, f"backups/again/{MARK_NAME}"))
        assert mark["pid"] == owner_record()["pid"]
    assert moto_server.keys(bucket) == []


async def test_probe(make_storage: StorageFactory, moto_server: MotoServer, bucket: str) -> None:
    await make_storage("some/prefix").probe()
    assert moto_server.keys(bucket) == []  # the probe object is gone again
    with pytest.raises(StorageProbeError) as caught:
        await make_storage("p", bucket="no-such-bucket-here").probe()
    assert str(caught.value) == "s3://no-such-bucket-here/p: no such bucket"


async def test_probe_of_an_unreachable_endpoint(make_storage: StorageFactory) -> None:
    storage = make_storage(endpoint_url="http://127.0.0.1:9", max_attempts=1)
    with pytest.raises(
        StorageProbeError, match=r"^s3://\S+: cannot connect to http://127\.0\.0\.1:9"
    ):
        await storage.probe()


async def test_the_audit_leaves_a_job_of_another_machine_alone_until_min_age(
    make_storage: StorageFactory, moto_server: MotoServer, bucket: str
) -> None:
    """Same host name, another machine (a cloned image): its job may be running, so a
    plain audit reports no debris and --clean with the default age touches nothing."""
    import datetime

    twin = {**owner_record(), "machine_id": "another machine", "pid": 2**22 + 1}
    put_mark(moto_server, bucket, "twin", twin)
    storage = make_storage()
    await storage.write_bytes("twin/stream-01-of-01.vdi", b"theirs")
    assert await storage.sweep() == []
    report = await audit(storage, clean=True, min_age=datetime.timedelta(hours=1))
    assert report.in_progress == ("twin",)
    assert not report.debris_left
    assert report.removed_objects == ()
    assert "backups/twin/stream-01-of-01.vdi" in moto_server.keys(bucket)
    assert f"backups/twin/{MARK_NAME}" in moto_server.keys(bucket)


async def test_a_sweep_that_lost_the_race_to_a_new_owner_removes_nothing(
    make_storage: StorageFactory, moto_server: MotoServer, bucket: str
) -> None:
    """A sweep read the dead owner's mark; before it removed anything, a new backup
    with the same id took the mark over and started writing: the sweep sees the mark
    changed and leaves everything of the new owner alone."""
    put_mark(moto_server, bucket, "again", dead_owner())
    sweeper = make_storage()
    (stale,) = [mark for mark in await sweeper.owner_marks() if mark.backup_id == "again"]
    assert stale.alive is False
    storage = make_storage()
    async with storage.in_progress("again"):
        sink = await storage.open_sink("again/stream-01-of-01.vdi")
        await sink.write(memoryview(bytes(2 * TEST_PART_SIZE)))
        await sink.flush()
        assert await sweeper._sweep_backup(stale) == []  # the race, made deterministic
        assert len(moto_server.uploads(bucket)) == 1
        assert f"backups/again/{MARK_NAME}" in moto_server.keys(bucket)
        await sink.abort()
