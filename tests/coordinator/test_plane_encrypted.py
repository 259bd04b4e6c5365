"""Encrypted backups record no logical SHA-256 (the AEAD tags and the stored SHA-256
already cover the stream); backups written before, which hashed both, still restore
with their logical digest checked."""

from __future__ import annotations

import hashlib
from pathlib import Path

import anyio
import pytest

from tests.coordinator.conftest import SMALL
from vdistream.coordinator import ExpectedStream, Job, JobKind, JobOptions, JobResult, JobStatus
from vdistream.engines import BytesConsumer, StripedBackup, StripedRestore
from vdistream.errors import StorageIntegrityError
from vdistream.pipeline import Key, parse_compression
from vdistream.pipeline.chain import PipelineConfig

pytestmark = pytest.mark.asyncio


async def _run(job: Job) -> JobResult:
    with anyio.fail_after(60, reason="the job did not end"):
        return await job.run()


async def _backup(root: Path, data: bytes, pipeline: PipelineConfig, backup_id: str) -> JobResult:
    job = Job(
        JobKind.BACKUP,
        StripedBackup(data, SMALL),
        str(root),
        backup_id=backup_id,
        options=JobOptions(devices=2),
        pipeline=pipeline,
    )
    result = await _run(job)
    assert result.ok, result.error
    return result


async def _restore(
    root: Path, backup_id: str, pipeline: PipelineConfig, expected: list[ExpectedStream]
) -> tuple[JobResult, BytesConsumer]:
    target = BytesConsumer()
    job = Job(
        JobKind.RESTORE,
        StripedRestore(target, SMALL),
        str(root),
        backup_id=backup_id,
        options=JobOptions(devices=2),
        expected=expected,
        pipeline=pipeline,
    )
    return await _run(job), target


@pytest.mark.parametrize("compression", ["none", "zstd:1"])
async def test_new_and_old_encrypted_backups_restore(
    tmp_path: Path, data: bytes, compression: str
) -> None:
    key = Key.generate()
    spec = parse_compression(compression)
    new = PipelineConfig(compression=spec, key=key)
    result = await _backup(tmp_path, data, new, "new")
    assert all(d.sha256 is None and d.stored_sha256 for d in result.devices)
    as_read = PipelineConfig.from_manifest(new.describe(), key)
    expected = [
        ExpectedStream(d.stored_bytes or 0, d.stored_sha256 or "", d.bytes, d.sha256)
        for d in result.devices
    ]
    restored, target = await _restore(tmp_path, "new", as_read, expected)
    assert restored.status is JobStatus.SUCCEEDED, restored.error
    assert target.getvalue() == data

    # what the previous version wrote: both digests, and a manifest without the key
    old = PipelineConfig(compression=spec, key=key, logical_digest=True)
    result = await _backup(tmp_path, data, old, "old")
    assert all(d.sha256 for d in result.devices)
    recorded = {k: v for k, v in old.describe().items() if k != "logical_digest"}
    as_read = PipelineConfig.from_manifest(recorded, key)
    assert as_read.hashes_logical
    expected = [
        ExpectedStream(d.stored_bytes or 0, d.stored_sha256 or "", d.bytes, d.sha256)
        for d in result.devices
    ]
    restored, target = await _restore(tmp_path, "old", as_read, expected)
    assert restored.status is JobStatus.SUCCEEDED, restored.error
    assert target.getvalue() == data
    assert restored.devices[0].sha256 == result.devices[0].sha256

    # ... and its logical digest is still checked
    wrong = expected[0]
    expected[0] = ExpectedStream(
        wrong.stored_bytes, wrong.stored_sha256, wrong.logical_bytes, hashlib.sha256().hexdigest()
    )
    restored, target = await _restore(tmp_path, "old", as_read, expected)
    assert restored.status is JobStatus.FAILED
    assert isinstance(restored.error, StorageIntegrityError), restored.error
    assert "logical stream does not match" in str(restored.error)
    assert not target.finished
