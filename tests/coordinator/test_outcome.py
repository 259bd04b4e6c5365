"""Each device's pump reports a frozen outcome; the job publishes its set's statistics;
a device that sends DISCARD abandons the whole backup."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import anyio
import pytest

from tests.coordinator.conftest import SMALL, tree
from tests.coordinator.faults import Faults, FaultyStorage
from vdistream.coordinator import AbortCause, Job, JobKind, JobOptions, JobStatus
from vdistream.engines import (
    BytesConsumer,
    Direction,
    Engine,
    EngineResult,
    StripedBackup,
    StripedRestore,
    device_names,
)
from vdistream.errors import JobAbortedError
from vdistream.protocol import CommandCode, Completion, Features
from vdistream.pump import PumpEnd
from vdistream.storage import FileStorage
from vdistream.vdi import Registry, ServerVirtualDeviceSet, SetStatistics

pytestmark = pytest.mark.asyncio


async def test_device_outcomes_are_frozen_and_match_the_stored_bytes(
    tmp_path: Path, data: bytes
) -> None:
    job = Job(JobKind.BACKUP, StripedBackup(data, SMALL), str(tmp_path), backup_id="o")
    result = await job.run()
    assert result.ok, result.error
    outcomes = job.outcomes()
    assert len(outcomes) == len(result.devices) == 4
    for outcome, device in zip(outcomes, result.devices, strict=True):
        stored = (tmp_path / device.key).read_bytes()
        assert outcome.end is PumpEnd.CLOSED
        assert outcome.committed
        assert outcome.error is None
        assert outcome.left is None
        assert outcome.bytes == len(stored)  # no stages: the logical stream is the stored one
        assert outcome.stored_bytes == len(stored)
        assert outcome.stored_sha256 == hashlib.sha256(stored).hexdigest()
        assert outcome.sha256 == outcome.stored_sha256
        assert outcome.commands > 0
        # the job's result is the outcome, folded
        assert (device.bytes, device.commands) == (outcome.bytes, outcome.commands)
        assert (device.sha256, device.stored_bytes, device.stored_sha256) == (
            outcome.sha256,
            outcome.stored_bytes,
            outcome.stored_sha256,
        )
    with pytest.raises(dataclasses.FrozenInstanceError):
        outcomes[0].committed = False  # type: ignore[misc]

    # a restore's outcomes carry the digests of what it read: the same streams
    reader = Job(
        JobKind.RESTORE,
        StripedRestore(BytesConsumer(), SMALL),
        str(tmp_path),
        backup_id="o",
        keys=[d.key for d in result.devices],
    )
    restored = await reader.run()
    assert restored.ok, restored.error
    assert [(o.stored_bytes, o.stored_sha256) for o in reader.outcomes()] == [
        (o.stored_bytes, o.stored_sha256) for o in outcomes
    ]
    assert not any(o.committed for o in reader.outcomes())


async def test_job_statistics_show_the_sets_buffers_and_outstanding_commands(
    tmp_path: Path, data: bytes
) -> None:
    storage = FaultyStorage(FileStorage(tmp_path), Faults(write_delay=0.01))
    job = Job(JobKind.BACKUP, StripedBackup(data, SMALL), storage, backup_id="s")
    assert job.statistics() is None  # no set yet
    seen: list[SetStatistics] = []
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(job.run)
            while job.status is not JobStatus.SUCCEEDED:
                stats = job.statistics()
                if stats is not None and stats.buffers_in_use and any(stats.outstanding):
                    seen.append(stats)
                await anyio.sleep(0.005)
    assert seen, "the job never showed a buffer in use with a command outstanding"
    buffers = SMALL.buffers_for(4)
    assert all(s.buffers_total == buffers for s in seen)
    assert all(0 < s.buffers_in_use <= buffers for s in seen)
    assert all(len(s.outstanding) == 4 for s in seen)
    assert job.statistics() is None  # the set is closed


class _Discarding(Engine):
    """Writes a block on every device, then DISCARDs on device 0 and closes normally."""

    direction = Direction.BACKUP

    def __init__(self) -> None:
        self.discard: Completion | None = None

    async def run(self, set_name: str, *, registry: Registry | None = None) -> EngineResult:
        sds = ServerVirtualDeviceSet(registry=registry)
        sds.open(None, set_name)
        count = sds.get_configuration().device_count
        sds.begin_configuration(Features.WRITE_MEDIA, 4096, 0, 65536)
        sds.request_buffers(65536, 0, count)
        sds.end_configuration()
        devices = [sds.open_device(name) for name in device_names(set_name, count)]
        await sds.wait_active(5)
        for device in devices:
            buffer = await sds.allocate_buffer(65536)
            buffer[:] = b"\xab" * 65536
            written = await device.send_command(CommandCode.WRITE, 65536, 0, buffer)
            assert written.completion == Completion.SUCCESS
            sds.free_buffer(buffer)
        self.discard = Completion((await devices[0].send_command(CommandCode.DISCARD)).completion)
        for device in devices:
            device.close_device()
        sds.close()
        return EngineResult(Direction.BACKUP, set_name, (), 65536 * count)


async def test_a_discard_through_the_pump_abandons_the_backup(
    tmp_path: Path, older: dict[str, str]
) -> None:
    faults = Faults()
    engine = _Discarding()
    job = Job(
        JobKind.BACKUP,
        engine,
        FaultyStorage(FileStorage(tmp_path), faults),
        backup_id="discarded",
        options=JobOptions(devices=3),
    )
    result = await job.run()
    assert engine.discard is Completion.SUCCESS  # the pump took the DISCARD
    assert [o.end for o in job.outcomes()] == [PumpEnd.DISCARDED, PumpEnd.CLOSED, PumpEnd.CLOSED]
    assert result.status is JobStatus.FAILED
    assert result.aborted_by is AbortCause.ENGINE
    assert result.reason == "the engine discarded the backup"
    assert isinstance(result.error, JobAbortedError)
    assert faults.commits_started == 0
    assert faults.aborted == 3
    assert tree(tmp_path) == older  # nothing of the discarded backup, the older one intact
