"""A restore checks each stream against what the manifest recorded *before* the engine
hears of the stream's end: a stream that does not match fails its last READ, so the
engine discards its target instead of publishing damaged data."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from tests.coordinator.conftest import SMALL
from vdistream.coordinator import (
    ExpectedStream,
    Job,
    JobKind,
    JobOptions,
    JobResult,
    JobStatus,
    backup,
)
from vdistream.engines import BytesConsumer, StripedBackup, StripedRestore
from vdistream.errors import StorageIntegrityError

pytestmark = pytest.mark.asyncio


async def _restore(root: Path, expected: list[ExpectedStream]) -> tuple[JobResult, BytesConsumer]:
    target = BytesConsumer()
    job = Job(
        JobKind.RESTORE,
        StripedRestore(target, SMALL),
        str(root),
        backup_id="b",
        options=JobOptions(devices=2),
        expected=expected,
    )
    with anyio.fail_after(30, reason="the restore did not end"):
        result = await job.run()
    return result, target


@pytest.mark.parametrize("damage", ["sha256", "size"])
async def test_a_stream_unlike_its_manifest_is_never_published(
    tmp_path: Path, data: bytes, damage: str
) -> None:
    with anyio.fail_after(30, reason="the backup did not end"):
        result = await backup(
            StripedBackup(data, SMALL), str(tmp_path), backup_id="b", options=JobOptions(devices=2)
        )
    assert result.ok, result.error
    expected = [ExpectedStream(d.stored_bytes or 0, d.stored_sha256 or "") for d in result.devices]

    restored, target = await _restore(tmp_path, expected)  # the sound backup restores
    assert restored.status is JobStatus.SUCCEEDED
    assert target.finished
    assert target.getvalue() == data

    wrong = expected[1]
    if damage == "sha256":
        expected[1] = ExpectedStream(wrong.stored_bytes, "0" * 64)
    else:
        expected[1] = ExpectedStream(wrong.stored_bytes + 1, wrong.stored_sha256)
    restored, target = await _restore(tmp_path, expected)
    assert restored.status is JobStatus.FAILED
    assert isinstance(restored.error, StorageIntegrityError), restored.error
    assert "does not match the manifest" in str(restored.error)
    assert str(restored.error).startswith("device 1: ")  # the stream, in the user's terms
    assert not target.finished  # the engine heard of a read fault, never of an end
    assert target.discarded
