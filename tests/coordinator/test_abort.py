"""Abort at every phase, from every cause: one path, nothing left behind.

Every scenario runs a 4-device backup into a directory that already holds an older,
complete backup, makes the job end early, then checks (``assert_clean``): no file of
the aborted backup is visible, the older backup is untouched, the set is closed and
no task is left running. Sinks that are slow on purpose read their buffer after the
delay, so a buffer handed back before its I/O finished would fail the job loudly.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import pytest

from tests.coordinator.conftest import SMALL, assert_clean
from tests.coordinator.faults import Faults, FaultyStorage
from vdistream.coordinator import AbortCause, Job, JobKind, JobOptions, JobResult, JobStatus
from vdistream.engines import (
    Action,
    ByteProducer,
    Direction,
    Engine,
    EngineError,
    EngineResult,
    FailPoint,
    Phase,
    ScopedBackup,
    StripedBackup,
)
from vdistream.errors import JobAbortedError, StorageError, StorageFullError
from vdistream.pump import PumpEnd
from vdistream.storage import FileStorage
from vdistream.vdi import Registry

pytestmark = pytest.mark.asyncio

Trigger = Callable[[Job, Faults], Awaitable[None]]


async def until(condition: Callable[[], bool], timeout: float = 10) -> None:
    """Poll a counter of the fakes; they have no event to wait on, and polling is bounded."""
    with anyio.fail_after(timeout):
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.005)


async def run_job(
    root: Path,
    data: bytes,
    *,
    faults: Faults | None = None,
    fail_at: FailPoint | None = None,
    trigger: Trigger | None = None,
    **options: float,
) -> tuple[Job, JobResult, Faults]:
    faults = faults or Faults(write_delay=0.002)
    storage = FaultyStorage(FileStorage(root), faults)
    engine = StripedBackup(data, SMALL, fail_at=fail_at)
    job = Job(
        JobKind.BACKUP,
        engine,
        storage,
        backup_id="aborted",
        options=JobOptions(devices=4, **options),  # type: ignore[arg-type]
    )
    result: list[JobResult] = []
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:

            async def run() -> None:
                result.append(await job.run())
                tg.cancel_scope.cancel()

            tg.start_soon(run)
            if trigger is not None:
                await trigger(job, faults)
            await anyio.sleep_forever()
    return job, result[0], faults


def streaming(job: Job) -> bool:
    return job.progress.moved()[0] > 64 * 1024


# --- the engine -------------------------------------------------------------------


@pytest.mark.parametrize(
    "phase",
    [
        Phase.BEFORE_CONFIGURATION,
        Phase.AFTER_CONFIGURATION,
        Phase.MID_STREAM,
        Phase.DURING_FLUSH,
        Phase.BEFORE_CLOSE,
    ],
)
@pytest.mark.parametrize("action", [Action.SIGNAL_ABORT, Action.RAISE])
async def test_engine_failure_or_abort_at_each_phase(
    tmp_path: Path, data: bytes, older: dict[str, str], phase: Phase, action: Action
) -> None:
    job, result, faults = await run_job(
        tmp_path, data, fail_at=FailPoint(phase, action, after_commands=8)
    )
    assert result.status is JobStatus.FAILED
    assert result.aborted_by is AbortCause.ENGINE
    assert isinstance(result.error, EngineError)
    assert faults.commits_started == 0
    assert_clean(job, tmp_path, older)


async def test_engine_that_never_configures(
    tmp_path: Path, data: bytes, older: dict[str, str]
) -> None:
    job, result, _ = await run_job(
        tmp_path,
        data,
        fail_at=FailPoint(Phase.BEFORE_CONFIGURATION, Action.STALL),
        configuration_timeout=0.2,
    )
    assert result.aborted_by is AbortCause.ENGINE
    assert "did not configure the set within 0.2 s" in (result.reason or "")
    assert_clean(job, tmp_path, older)


# --- the stall watchdog --------------------------------------------------------------


@pytest.mark.parametrize("phase", [Phase.AFTER_CONFIGURATION, Phase.MID_STREAM, Phase.DURING_FLUSH])
async def test_stalled_engine_is_cut_off_by_the_watchdog(
    tmp_path: Path, data: bytes, older: dict[str, str], phase: Phase
) -> None:
    # Nothing but the watchdog (0.3 s) ends a stalled engine: wait for it, bounded.
    with anyio.fail_after(15, reason="the stall watchdog did not cut the engine off"):
        job, result, _ = await run_job(
            tmp_path,
            data,
            fail_at=FailPoint(phase, Action.STALL, after_commands=8),
            stall_timeout=0.3,
        )
    assert result.status is JobStatus.ABORTED
    assert result.aborted_by is AbortCause.WATCHDOG
    assert isinstance(result.error, JobAbortedError)
    assert "no device moved" in str(result.error)
    assert_clean(job, tmp_path, older)


# --- the user ------------------------------------------------------------------------


async def _abort_at_once(job: Job, faults: Faults) -> None:
    await anyio.sleep(0.05)
    job.abort("operator pressed stop")


async def _abort_mid_stream(job: Job, faults: Faults) -> None:
    await until(lambda: streaming(job))
    job.abort("operator pressed stop")


async def _abort_during_flush(job: Job, faults: Faults) -> None:
    await until(lambda: faults.flushes_started > 0)
    job.abort("operator pressed stop")


async def _abort_during_commit(job: Job, faults: Faults) -> None:
    await until(lambda: faults.commits_started > 0)
    job.abort("operator pressed stop")


@pytest.mark.parametrize(
    ("trigger", "faults"),
    [
        (_abort_at_once, Faults()),
        (_abort_mid_stream, Faults(write_delay=0.01)),
        (_abort_during_flush, Faults(flush_delay=0.2)),
        (_abort_during_commit, Faults(hang_commit=True)),
    ],
    ids=["before-configuration", "mid-stream", "during-flush", "during-commit"],
)
async def test_user_abort_at_each_phase(
    tmp_path: Path, data: bytes, older: dict[str, str], trigger: Trigger, faults: Faults
) -> None:
    fail_at = (
        FailPoint(Phase.BEFORE_CONFIGURATION, Action.STALL) if trigger is _abort_at_once else None
    )
    job, result, faults = await run_job(
        tmp_path, data, faults=faults, fail_at=fail_at, trigger=trigger, drain_timeout=1
    )
    assert result.status is JobStatus.ABORTED
    assert result.aborted_by is AbortCause.USER
    assert result.reason == "operator pressed stop"
    assert isinstance(result.error, JobAbortedError)
    assert_clean(job, tmp_path, older)


# --- storage -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "faults",
    [Faults(fail_after_bytes=200_000), Faults(fail_flush=True)],
    ids=["write", "flush"],
)
async def test_sink_failure_aborts_the_job(
    tmp_path: Path, data: bytes, older: dict[str, str], faults: Faults
) -> None:
    job, result, _ = await run_job(tmp_path, data, faults=faults)
    assert result.status is JobStatus.FAILED
    assert result.aborted_by is AbortCause.SINK
    assert isinstance(result.error, StorageError)
    assert "injected" in str(result.error)
    assert "device" in str(result.error)
    assert_clean(job, tmp_path, older)


async def test_failed_commit_unpublishes_the_devices_already_committed(
    tmp_path: Path, data: bytes, older: dict[str, str]
) -> None:
    job, result, faults = await run_job(
        tmp_path, data, faults=Faults(fail_commit_of="stream-02-of-04.vdi")
    )
    assert faults.commits_started == 4
    assert result.aborted_by is AbortCause.SINK
    assert "injected commit failure" in str(result.error)
    assert_clean(job, tmp_path, older)


async def test_hanging_sink_is_cut_off_by_the_drain_timeout(
    tmp_path: Path, data: bytes, older: dict[str, str]
) -> None:
    # A write that never returns ends only through the watchdog and the drain (0.3 s
    # each): wait for that, bounded.
    with anyio.fail_after(15, reason="the drain timeout did not cut the hanging sink off"):
        job, result, _ = await run_job(
            tmp_path,
            data,
            faults=Faults(hang_write_after_bytes=100_000),
            stall_timeout=0.3,
            drain_timeout=0.3,
        )
    assert result.aborted_by is AbortCause.WATCHDOG
    assert_clean(job, tmp_path, older)


# --- the caller ------------------------------------------------------------------------


@pytest.mark.parametrize("when", ["mid-stream", "during-commit"])
async def test_cancelling_the_caller_aborts_cleanly(
    tmp_path: Path, data: bytes, older: dict[str, str], when: str
) -> None:
    faults = Faults(write_delay=0.01) if when == "mid-stream" else Faults(hang_commit=True)
    storage = FaultyStorage(FileStorage(tmp_path), faults)
    job = Job(JobKind.BACKUP, StripedBackup(data, SMALL), storage, backup_id="x")
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:

            async def run() -> None:
                await job.run()
                raise AssertionError("run() returned although it was cancelled")

            tg.start_soon(run)
            if when == "mid-stream":
                await until(lambda: streaming(job))
            else:
                await until(lambda: faults.commits_started > 0)
            tg.cancel_scope.cancel()
    assert job.status is JobStatus.ABORTED
    assert_clean(job, tmp_path, older)


# --- a disk that fills up ------------------------------------------------------------------


async def test_disk_full_names_device_and_path(tmp_path: Path, data: bytes) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    await anyio.run_process(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)])
    try:
        job = Job(JobKind.BACKUP, StripedBackup(data, SMALL), str(mount), backup_id="full")
        # Bounded: a sink error that does not end the job fails here, not at pytest's 120 s.
        with anyio.fail_after(30, reason="the job did not end after its disk filled up"):
            result = await job.run()
        assert result.status is JobStatus.FAILED
        assert result.aborted_by is AbortCause.SINK
        assert isinstance(result.error, StorageFullError)
        message = str(result.error)
        assert str(mount) in message
        assert "device 'vdistream-full-" in message
        assert [p for p in mount.rglob("*") if p.is_file()] == []
    finally:
        await anyio.run_process(["umount", str(mount)])


class _SlowStart(ByteProducer):
    """Silent for a while before its first byte, like a large snapshot being taken."""

    def __init__(self, data: bytes, silent: float, *, vouch: bool) -> None:
        self.data = memoryview(data)
        self.silent = silent
        self.vouch = vouch
        self.busy = False
        self.started = False

    async def readinto(self, view: memoryview) -> int:
        if not self.started:
            self.started = True
            self.busy = self.vouch
            await anyio.sleep(self.silent)
            self.busy = False
        n = min(view.nbytes, self.data.nbytes)
        view[:n] = self.data[:n]
        self.data = self.data[n:]
        return n


@pytest.mark.parametrize("vouch", [True, False])
async def test_silent_engine_work_it_vouches_for_is_not_a_stall(
    tmp_path: Path, data: bytes, vouch: bool
) -> None:
    job = Job(
        JobKind.BACKUP,
        ScopedBackup(_SlowStart(data, 0.8, vouch=vouch), SMALL),
        str(tmp_path),
        backup_id="slow",
        options=JobOptions(devices=2, stall_timeout=0.2),
    )
    result = await job.run()
    if vouch:
        assert result.ok, result.error
    else:
        assert result.aborted_by is AbortCause.WATCHDOG


# --- an abort after every device ended, before the engine returned ---------------------


class _LateFailure(Engine):
    """A striped backup whose engine, once every device is closed, waits for ``fail``
    and then fails (the job's drain deadline ends a wait that an abort made moot)."""

    direction = Direction.BACKUP

    def __init__(self, data: bytes) -> None:
        self.inner = StripedBackup(data, SMALL)
        self.fail = anyio.Event()

    async def run(self, set_name: str, *, registry: Registry | None = None) -> EngineResult:
        await self.inner.run(set_name, registry=registry)
        await self.fail.wait()
        raise EngineError("failed after closing every device", set_name=set_name)


def _every_device_ended(job: Job) -> bool:
    outcomes = job.outcomes()
    return len(outcomes) == 4 and all(o.end is PumpEnd.CLOSED for o in outcomes)


@pytest.mark.parametrize("cause", [AbortCause.USER, AbortCause.ENGINE])
async def test_no_sink_of_an_aborted_job_is_ever_committed(
    tmp_path: Path, data: bytes, older: dict[str, str], cause: AbortCause
) -> None:
    """The pumps wait for the job's decision with their streams complete; an abort then
    must abort every sink, never commit one (the cleanup would hide a commit)."""
    faults = Faults()
    engine = _LateFailure(data)
    job = Job(
        JobKind.BACKUP,
        engine,
        FaultyStorage(FileStorage(tmp_path), faults),
        backup_id="aborted",
        options=JobOptions(devices=4, drain_timeout=0.5),
    )
    results: list[JobResult] = []
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:

            async def run() -> None:
                results.append(await job.run())

            tg.start_soon(run)
            await until(lambda: _every_device_ended(job))
            if cause is AbortCause.USER:
                job.abort("operator pressed stop")
            else:
                engine.fail.set()
    result = results[0]
    assert result.aborted_by is cause
    assert faults.commits_started == 0
    assert faults.aborted == 4
    assert not any(o.committed for o in job.outcomes())
    assert_clean(job, tmp_path, older)
