"""Striped backups through file sinks, restored through file sources, byte-identical."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.coordinator.conftest import SMALL, tree
from vdistream import CommandCode
from vdistream.coordinator import Job, JobKind, JobOptions, JobStatus, backup, restore
from vdistream.engines import (
    BytesConsumer,
    StripedBackup,
    StripedRestore,
    StripingOptions,
)

pytestmark = pytest.mark.asyncio


@pytest.mark.parametrize("devices", [1, 4, 64])
@pytest.mark.parametrize("disk_like", [False, True], ids=["pipe", "disk"])
async def test_striped_backup_and_restore(
    tmp_path: Path, data: bytes, devices: int, disk_like: bool
) -> None:
    options = JobOptions(devices=devices, disk_like=disk_like)
    engine = StripedBackup(data, SMALL)
    result = await backup(engine, str(tmp_path), backup_id="b1", options=options)
    assert result.ok, result.error
    assert result.status is JobStatus.SUCCEEDED
    assert len(result.devices) == devices
    files = tree(tmp_path)
    assert sorted(files) == sorted(d.key for d in result.devices)  # no temporaries left
    assert sum((tmp_path / d.key).stat().st_size for d in result.devices) == result.bytes
    assert all(d.url.startswith("file://") and d.url.endswith(d.key) for d in result.devices)

    target = BytesConsumer()
    reading = StripingOptions(
        block_size=4096, max_transfer_size=65536, read_sizes=(8192, 61440, 4096)
    )
    restored = await restore(StripedRestore(target, reading), str(tmp_path), "b1", options=options)
    assert restored.ok, restored.error
    assert target.getvalue() == data
    assert tree(tmp_path) == files  # restore changes nothing


async def test_commands_seen_by_the_engine(tmp_path: Path, data: bytes) -> None:
    engine = StripedBackup(data, SMALL)
    result = await backup(engine, str(tmp_path), options=JobOptions(devices=4))
    stats = result.engine_result
    # REQUEST_COMPLETE is asked for by default and honoured: FLUSH and COMPLETE per device
    assert stats.commands(CommandCode.FLUSH) == [1, 1, 1, 1]  # type: ignore[attr-defined]
    assert stats.commands(CommandCode.COMPLETE) == [1, 1, 1, 1]  # type: ignore[attr-defined]


async def test_memory_and_null_storage(data: bytes) -> None:
    result = await backup(StripedBackup(data, SMALL), "memory://jobs", backup_id="m")
    assert result.ok
    target = BytesConsumer()
    assert (await restore(StripedRestore(target, SMALL), "memory://jobs", "m")).ok
    assert target.getvalue() == data
    assert (await backup(StripedBackup(data, SMALL), "null://")).ok


async def test_progress_and_log_events(
    tmp_path: Path, data: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vdistream")
    job = Job(JobKind.BACKUP, StripedBackup(data, SMALL), str(tmp_path), backup_id="p")
    result = await job.run()
    snapshot = job.progress.snapshot()
    assert [d.name for d in snapshot.devices] == [d.name for d in result.devices]
    assert snapshot.bytes == result.bytes > len(data)  # headers and trailers included
    assert all(d.commands > 0 for d in snapshot.devices)
    events = [r.msg for r in caplog.records if r.name == "vdistream.coordinator"]
    for name in ("job_started", "device_opened", "sink_committed", "job_finished"):
        assert name in events
    committed = [r for r in caplog.records if r.msg == "sink_committed"]
    assert {r.job for r in committed} == {"p"}
    assert len({r.device for r in committed}) == 4
