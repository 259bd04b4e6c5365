"""Mirrored backups between a directory and moto's S3 server (a real HTTP server on
127.0.0.1, ``tests/s3/conftest.py``), in both orders; S3 failing midway through its
fault proxy leaves nothing on either side (no object, no open multipart upload)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import anyio
import pytest

from tests.s3.conftest import TEST_PART_SIZE, MotoServer, StorageFactory
from tests.s3.proxy import FaultProxy
from tests.storage.test_file import files_under
from vdistream.coordinator import AbortCause, JobStatus
from vdistream.errors import StorageError
from vdistream.operations import BackupSettings, KeySource, run_backup, run_restore, run_verify
from vdistream.pipeline.keys import generate_key_file
from vdistream.storage import FileStorage, OrphanUploadsError
from vdistream.storage.mirror import MirrorStorage

pytestmark = pytest.mark.asyncio

SMALL = {"block_size": 4096, "max_transfer_size": 65536}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def restored_from(ref: str, out: Path, keys: KeySource | None = None) -> bytes:
    result = await run_restore(ref, f"cmd:sh -c 'cat > {out}'", keys=keys)
    assert result.ok, result.error
    return await anyio.Path(out).read_bytes()


async def test_file_and_s3_each_restore_and_verify_alone(
    tmp_path: Path, moto_server: MotoServer, bucket: str
) -> None:
    data = os.urandom(700_000) + bytes(500_000)
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    key = tmp_path / "backup.key"
    generate_key_file(key)
    keys = KeySource(key_file=str(key))
    local = tmp_path / "local"
    s3 = f"s3://{bucket}/db1?endpoint_url={moto_server.endpoint}"
    outcome = await run_backup(
        f"cmd:cat {source}",
        str(local),
        BackupSettings(devices=2, backup_id="b", encryption=keys, mirror=s3, **SMALL),
    )
    assert outcome.ok, outcome.result.error
    assert outcome.manifest_url == (local / "b" / "manifest.json").as_uri()
    assert outcome.mirror_manifest_url == f"s3://{bucket}/db1/b/manifest.json"

    streams = [f"b/stream-{i:02d}-of-02.vdi" for i in range(2)]
    assert files_under(local) == ["b/manifest.json", *streams]
    assert sorted(moto_server.keys(bucket)) == [
        f"db1/{name}" for name in ["b/manifest.json", *streams]
    ]
    assert moto_server.uploads(bucket) == []
    for name in streams:  # encrypted once, teed: the same ciphertext on both sides
        assert moto_server.get(bucket, f"db1/{name}") == (local / name).read_bytes()
    remote = json.loads(moto_server.get(bucket, "db1/b/manifest.json"))
    assert [d["url"] for d in remote["devices"]] == [f"s3://{bucket}/db1/{n}" for n in streams]

    ref = f"s3://{bucket}/db1/b?endpoint_url={moto_server.endpoint}"
    for name in streams:  # the local copy cannot help: it is gone
        os.remove(local / name)
    assert await restored_from(ref, tmp_path / "from-s3", keys) == data
    report = await run_verify(ref, keys=keys)
    assert report.ok, report.checks
    report = await run_verify(f"{local}/b", keys=keys)
    assert not report.ok  # and the local side, without its streams, says so


async def test_s3_failing_midway_leaves_nothing_in_either(
    tmp_path: Path,
    faulty: StorageFactory,
    proxy: FaultProxy,
    moto_server: MotoServer,
    bucket: str,
) -> None:
    """S3 (the destination) keeps refusing the second part of a stream: the job fails
    with S3's error, the mirror's directory keeps nothing, S3 no object and no upload."""
    proxy.add("error", r"^PUT /\S*[?&]partNumber=2(&|$)", count=10**6)
    s3 = faulty(max_attempts=2)
    local = tmp_path / "local"
    outcome = await run_backup(
        f"cmd:head -c {12 * TEST_PART_SIZE} /dev/urandom",
        s3,
        BackupSettings(devices=2, backup_id="b", mirror=str(local), **SMALL),
    )
    assert not outcome.ok
    result = outcome.result
    assert result.status is JobStatus.FAILED
    assert result.aborted_by is AbortCause.SINK
    assert isinstance(result.error, StorageError)
    assert "SlowDown" in str(result.error)
    assert bucket in str(result.error)
    assert files_under(local) == []
    assert moto_server.keys(bucket) == []
    assert moto_server.uploads(bucket) == []


async def test_a_commit_failing_on_one_side_takes_back_the_other(
    tmp_path: Path,
    faulty: StorageFactory,
    proxy: FaultProxy,
    moto_server: MotoServer,
    bucket: str,
) -> None:
    """S3's CompleteMultipartUpload keeps failing while the directory's commit succeeds
    (both run at once): the directory's committed object is deleted again, S3 keeps no
    object and no upload, and the error is S3's."""
    proxy.add("reset", r"^POST /\S*[?&]uploadId=", count=10**6)
    storage = MirrorStorage(FileStorage(tmp_path / "local"), faulty(max_attempts=2))
    sink = await storage.open_sink("b/s", device="dev0")
    await sink.write(memoryview(os.urandom(3 * TEST_PART_SIZE)))
    with pytest.raises(StorageError, match=r"complete upload.*backups/b/s") as caught:
        await sink.commit()
    assert not isinstance(caught.value, OrphanUploadsError)
    assert files_under(tmp_path / "local") == []
    await sink.abort()
    assert files_under(tmp_path / "local") == []
    assert moto_server.keys(bucket) == []
    assert moto_server.uploads(bucket) == []


async def test_what_the_s3_mirror_could_not_remove_is_named_with_its_remedy(
    tmp_path: Path,
    faulty: StorageFactory,
    proxy: FaultProxy,
    moto_server: MotoServer,
    bucket: str,
) -> None:
    """The producer fails midway and S3 refuses to abort the mirror's uploads: the
    directory keeps nothing, and the job's one-line error is S3's leftovers with the
    command that removes them (as for an S3 destination alone)."""
    proxy.add("error", r"^DELETE /\S*[?&]uploadId=", status=403, code="AccessDenied", count=10**6)
    local = tmp_path / "local"
    outcome = await run_backup(
        f"cmd:sh -c 'head -c {6 * TEST_PART_SIZE} /dev/urandom; exit 3'",
        str(local),
        BackupSettings(devices=2, backup_id="b", mirror=faulty(max_attempts=2)),
    )
    assert not outcome.ok
    error = outcome.result.error
    assert isinstance(error, OrphanUploadsError), repr(error)
    message = str(error)
    assert "\n" not in message
    assert f"run `vdistream storage audit --clean s3://{bucket}/backups`" in message
    assert "the job failed first: " in message
    assert moto_server.uploads(bucket)  # left, as the message says
    assert files_under(local) == []
