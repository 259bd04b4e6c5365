"""S3, zero orphans in every case: lost answers to CreateMultipartUpload and
CompleteMultipartUpload, lost answers to a put, and a store that refuses every abort
(one error line naming what is left and the command that removes it)."""

from __future__ import annotations

import os

import pytest

from tests.s3.conftest import TEST_PART_SIZE, MotoServer, StorageFactory
from tests.s3.proxy import FaultProxy
from vdistream.catalog.audit import audit
from vdistream.errors import StorageError
from vdistream.storage import OrphanUploadsError
from vdistream.storage.s3 import S3Storage

pytestmark = pytest.mark.asyncio

P = TEST_PART_SIZE
CREATE = r"^POST /\S*[?&]uploads"
COMPLETE = r"^POST /\S*[?&]uploadId="
ABORT = r"^DELETE /\S*[?&]uploadId="
EVER = 10**6


async def upload(storage: S3Storage, key: str, data: bytes) -> None:
    async with await storage.open_sink(key) as sink:
        await sink.write(memoryview(data))
        await sink.commit()


async def test_a_lost_create_answer_leaves_no_upload_after_a_success(
    faulty: StorageFactory, proxy: FaultProxy, moto_server: MotoServer, bucket: str
) -> None:
    """The server creates the upload, the answer is lost, the retry creates another:
    the backup succeeds, and the first upload is aborted."""
    fault = proxy.add("cut", CREATE, after_bytes=0)
    data = os.urandom(3 * P + 7)
    await upload(faulty(), "db/stream", data)
    assert fault.hits == 1
    assert sum(CREATE[1:5] in line and "uploads" in line for line in proxy.requests) >= 2
    assert moto_server.get(bucket, "backups/db/stream") == data
    assert moto_server.uploads(bucket) == []


async def test_creates_that_all_lose_their_answer_leave_no_upload(
    faulty: StorageFactory, proxy: FaultProxy, moto_server: MotoServer, bucket: str
) -> None:
    proxy.add("cut", CREATE, after_bytes=0, count=EVER)
    # another sink's upload on another key, and one on this key from long ago, stay
    other = moto_server.client.create_multipart_upload(Bucket=bucket, Key="backups/db/streamX")
    with pytest.raises(StorageError, match="start upload"):
        await upload(faulty(max_attempts=3), "db/stream", os.urandom(2 * P))
    assert moto_server.uploads(bucket) == [("backups/db/streamX", other["UploadId"])]
    assert moto_server.keys(bucket) == []


async def test_a_lost_complete_answer_then_failures_leave_no_object(
    faulty: StorageFactory, proxy: FaultProxy, moto_server: MotoServer, bucket: str
) -> None:
    """Complete reached S3 (the object exists), its answer was lost, every retry fails:
    the commit fails, and the abort deletes the object the sink completed."""
    proxy.add("cut", COMPLETE, after_bytes=0)
    proxy.add("reset", COMPLETE, count=EVER)
    with pytest.raises(StorageError, match="complete upload"):
        await upload(faulty(max_attempts=2), "db/stream", os.urandom(2 * P + 1))
    assert moto_server.keys(bucket) == []
    assert moto_server.uploads(bucket) == []


async def test_a_lost_put_answer_then_failures_leave_no_object(
    faulty: StorageFactory, proxy: FaultProxy, moto_server: MotoServer, bucket: str
) -> None:
    """The same for the single put of a small stream, and for ``write_bytes`` (a
    manifest that a failed backup must never leave behind)."""
    put = r"^PUT /[^ ?]*/backups/(small|manifest\.json)$"
    proxy.add("cut", put, after_bytes=0)
    proxy.add("reset", put, count=EVER)
    storage = faulty(max_attempts=2)
    with pytest.raises(StorageError, match="commit"):
        await upload(storage, "small", b"a small stream")
    assert moto_server.keys(bucket) == []
    proxy.faults[0].hits = 0
    with pytest.raises(StorageError, match="commit"):
        await storage.write_bytes("manifest.json", b'{"devices": []}')
    assert moto_server.keys(bucket) == []


async def test_a_store_that_refuses_every_abort_gets_one_line(
    make_storage: StorageFactory,
    faulty: StorageFactory,
    proxy: FaultProxy,
    moto_server: MotoServer,
    bucket: str,
) -> None:
    proxy.add("error", ABORT, status=403, code="AccessDenied", count=EVER)
    storage = faulty(max_attempts=2)
    sink = await storage.open_sink("db/stream", device="dev0")
    await sink.write(memoryview(os.urandom(2 * P)))
    await sink.flush()
    upload_id = sink.upload_id
    assert upload_id is not None

    with pytest.raises(OrphanUploadsError) as caught:
        await sink.abort()

    error = caught.value
    assert isinstance(error, StorageError)
    message = str(error)
    assert "\n" not in message
    assert f"upload db/stream {upload_id}" in message
    assert f"run `vdistream storage audit --clean s3://{bucket}/backups`" in message
    assert error.leftovers == (f"upload db/stream {upload_id}",)
    assert moto_server.uploads(bucket) == [("backups/db/stream", upload_id)]

    # what the message says to run removes it
    report = await audit(make_storage(), clean=True)
    assert [u.upload_id for u in report.aborted_uploads] == [upload_id]
    assert moto_server.uploads(bucket) == []


async def test_merged_orphan_errors_are_one_line() -> None:
    one = OrphanUploadsError("s3://b/p", ["upload a 1"], reason="S3 AccessDenied")
    two = OrphanUploadsError("s3://b/p", ["upload b 2", "upload a 1"])
    merged = OrphanUploadsError.merge([one, two])
    assert merged.leftovers == ("upload a 1", "upload b 2")
    assert str(merged) == (
        "the store refused to remove what the job wrote (S3 AccessDenied): left in "
        "s3://b/p: upload a 1, upload b 2; run `vdistream storage audit --clean s3://b/p` "
        "to remove them"
    )


async def test_a_failed_backup_whose_aborts_are_refused_ends_in_one_error_line(
    faulty: StorageFactory, proxy: FaultProxy, moto_server: MotoServer, bucket: str
) -> None:
    """A whole job: the producer fails after several parts, every abort is refused. The
    job's error is one OrphanUploadsError naming every upload left (never an exception
    group), and the command it names removes them."""
    from vdistream.operations import BackupSettings, run_backup

    proxy.add("error", ABORT, status=403, code="AccessDenied", count=EVER)
    size = 6 * P
    producer = f"cmd:sh -c 'head -c {size} /dev/urandom; exit 3'"
    outcome = await run_backup(
        producer, faulty(max_attempts=2), BackupSettings(devices=2, backup_id="b1")
    )
    assert not outcome.ok
    error = outcome.result.error
    assert isinstance(error, OrphanUploadsError), repr(error)
    message = str(error)
    assert "\n" not in message
    assert f"run `vdistream storage audit --clean s3://{bucket}/backups`" in message
    left = moto_server.uploads(bucket)
    assert left, "the refused aborts left the uploads"
    assert {f"upload {key.removeprefix('backups/')} {upload_id}" for key, upload_id in left} == set(
        error.leftovers
    )
    assert "the job failed first: " in message  # and why it failed

    report = await audit(faulty(), clean=False)
    assert {u.upload_id for u in report.orphan_uploads} == {u for _, u in left}
