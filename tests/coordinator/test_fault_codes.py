"""What an engine hears when the storage behind a device fails: the command completes
with the Win32 fault code of its direction (ERROR_WRITE_FAULT 29 for a WRITE or FLUSH,
ERROR_READ_FAULT 30 for a READ; DISK_FULL 112 when the medium is full), never SUCCESS,
and the job fails with the storage's error as its cause. A sink whose abort hangs is
cut off by the drain timeout."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from tests.coordinator.conftest import SMALL
from tests.coordinator.faults import Faults, FaultySink, FaultyStorage
from vdistream.coordinator import (
    AbortCause,
    ExpectedStream,
    Job,
    JobKind,
    JobOptions,
    JobResult,
    backup,
)
from vdistream.engines import Direction, Engine, EngineResult, StripedBackup, device_names
from vdistream.errors import StorageError, StorageFullError, StorageIntegrityError
from vdistream.protocol import CommandCode, Completion, Features
from vdistream.storage import FileStorage, Sink, Storage
from vdistream.vdi import Registry, ServerVirtualDeviceSet

pytestmark = pytest.mark.asyncio

BLOCK = 65536
WRITE_FAULT, READ_FAULT = 29, 30


class _OneDevice(Engine):
    """Sends ``script`` on a one-device set until a command fails; records each result
    as (completion, bytes transferred)."""

    def __init__(self, direction: Direction, script: list[CommandCode]) -> None:
        self._direction = direction
        self.script = script
        self.results: list[tuple[int, int]] = []

    @property
    def direction(self) -> Direction:
        return self._direction

    async def run(self, set_name: str, *, registry: Registry | None = None) -> EngineResult:
        sds = ServerVirtualDeviceSet(registry=registry)
        sds.open(None, set_name)
        media = Features.WRITE_MEDIA if self.direction is Direction.BACKUP else Features.READ_MEDIA
        sds.begin_configuration(media, 4096, 0, BLOCK)
        sds.request_buffers(BLOCK, 0, 1)
        sds.end_configuration()
        (device,) = [sds.open_device(name) for name in device_names(set_name, 1)]
        await sds.wait_active(5)
        buffer = await sds.allocate_buffer(BLOCK)
        buffer[:] = b"\x11" * BLOCK
        for code in self.script:
            size = BLOCK if code in (CommandCode.WRITE, CommandCode.READ) else 0
            data = buffer if size else None
            result = await device.send_command(code, size, 0, data)
            self.results.append((result.completion, result.bytes_transferred))
            if result.completion not in (Completion.SUCCESS, Completion.HANDLE_EOF):
                break
        sds.free_buffer(buffer)
        device.close_device()
        sds.close()
        return EngineResult(self.direction, set_name, (), 0)


async def _run(job: Job) -> JobResult:
    with anyio.fail_after(30, reason="the job did not end after its storage failed"):
        return await job.run()


def _job(kind: JobKind, engine: Engine, storage: Storage, **kwargs: object) -> Job:
    options = JobOptions(devices=1)
    return Job(kind, engine, storage, backup_id="b", options=options, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("faults", "script"),
    [
        (Faults(fail_after_bytes=BLOCK), [CommandCode.WRITE, CommandCode.WRITE]),
        (Faults(fail_flush=True), [CommandCode.WRITE, CommandCode.FLUSH]),
    ],
    ids=["write", "flush"],
)
async def test_a_failed_write_or_flush_completes_with_a_write_fault(
    tmp_path: Path, faults: Faults, script: list[CommandCode]
) -> None:
    engine = _OneDevice(Direction.BACKUP, script)
    storage = FaultyStorage(FileStorage(tmp_path), faults)
    job = _job(JobKind.BACKUP, engine, storage)
    result = await _run(job)
    assert engine.results == [(Completion.SUCCESS, BLOCK), (WRITE_FAULT, 0)]
    assert result.aborted_by is AbortCause.SINK
    assert isinstance(result.error, StorageError)
    assert str(result.error).startswith("injected")  # a backup's error names no index
    # the device's outcome names the error that failed it; its abort went through
    (outcome,) = job.outcomes()
    assert isinstance(outcome.error, StorageError)
    assert "injected" in str(outcome.error)
    assert not outcome.committed
    assert outcome.left is None


async def test_a_read_of_a_stream_unlike_its_manifest_completes_with_a_read_fault(
    tmp_path: Path,
) -> None:
    with anyio.fail_after(30, reason="the backup did not end"):
        stored = await backup(
            StripedBackup(b"\x22" * (BLOCK + 100), SMALL),
            str(tmp_path),
            backup_id="b",
            options=JobOptions(devices=1),
        )
    assert stored.ok, stored.error
    (device,) = stored.devices
    assert device.stored_bytes is not None
    expected = [ExpectedStream(device.stored_bytes, "0" * 64)]  # not its SHA-256
    engine = _OneDevice(Direction.RESTORE, [CommandCode.READ] * 4)
    result = await _run(_job(JobKind.RESTORE, engine, FileStorage(tmp_path), expected=expected))
    # the whole stream is read; the READ that would report its end fails instead
    *before, (last, _) = engine.results
    assert before
    assert before == [(Completion.SUCCESS, BLOCK)] * len(before)
    assert last == READ_FAULT
    assert isinstance(result.error, StorageIntegrityError)


class _Broken(FaultyStorage):
    """Sinks whose every WRITE finds the medium full, and whose abort may hang or fail."""

    def __init__(
        self, inner: Storage, *, hang_abort: bool = False, fail_abort: bool = False
    ) -> None:
        super().__init__(inner, Faults())
        self.hang_abort = hang_abort
        self.fail_abort = fail_abort
        self.sinks: list[FaultySink] = []

    async def open_sink(self, key: str, *, device: str | None = None) -> Sink:
        storage = self

        class Full(FaultySink):
            async def write(self, data: memoryview, *, position: int | None = None) -> None:
                raise StorageFullError("injected: no space left", url=self.url)

            async def abort(self) -> None:
                if storage.hang_abort:
                    await anyio.sleep_forever()
                await super().abort()
                if storage.fail_abort:
                    raise StorageError("injected abort failure", url=self.url)

        sink = Full(await self.inner.open_sink(key, device=device), self.faults)
        self.sinks.append(sink)
        return sink


async def test_a_full_medium_completes_the_write_with_disk_full(tmp_path: Path) -> None:
    engine = _OneDevice(Direction.BACKUP, [CommandCode.WRITE])
    result = await _run(_job(JobKind.BACKUP, engine, _Broken(FileStorage(tmp_path))))
    assert engine.results == [(Completion.DISK_FULL, 0)]
    assert isinstance(result.error, StorageFullError)


async def test_a_sink_abort_that_hangs_is_cut_off_by_the_drain_timeout(tmp_path: Path) -> None:
    engine = _OneDevice(Direction.BACKUP, [CommandCode.WRITE])
    storage = _Broken(FileStorage(tmp_path), hang_abort=True)
    job = Job(
        JobKind.BACKUP,
        engine,
        storage,
        backup_id="b",
        options=JobOptions(devices=1, drain_timeout=0.3),
    )
    result = await _run(job)  # bounded: only the drain timeout can end the hanging abort
    assert isinstance(result.error, StorageFullError)
    (outcome,) = job.outcomes()
    assert not outcome.committed
    for sink in storage.sinks:  # what the hanging abort left: the test's to clean
        await sink.inner.abort()


async def test_a_sink_abort_that_fails_is_reported_as_what_was_left(tmp_path: Path) -> None:
    engine = _OneDevice(Direction.BACKUP, [CommandCode.WRITE])
    job = _job(JobKind.BACKUP, engine, _Broken(FileStorage(tmp_path), fail_abort=True))
    result = await _run(job)
    (outcome,) = job.outcomes()
    assert isinstance(outcome.error, StorageFullError)  # what failed the device
    assert isinstance(outcome.left, StorageError)  # what its abort could not remove
    assert "injected abort failure" in str(outcome.left)
    assert isinstance(result.error, StorageFullError)  # the job's cause is the first error
