"""Failures abort the set (the client sees VDAbortError) and the engine raises."""

from __future__ import annotations

import random

import anyio
import anyio.lowlevel
import pytest

from tests.engines.fake_client import (
    BLOCK,
    CHUNK,
    OPTIONS,
    Fail,
    FakeClient,
    backup,
    run_job,
)
from vdistream import ClientState, CommandCode, Completion, Registry
from vdistream.engines import (
    Action,
    BytesConsumer,
    CommandFailedError,
    EngineAbortedError,
    EngineError,
    FailPoint,
    InjectedFaultError,
    Phase,
    StripedBackup,
    StripedRestore,
    StripingOptions,
    device_names,
)

pytestmark = pytest.mark.asyncio

DEVICES = 3
DATA = random.Random(7).randbytes(20 * CHUNK + 5)
BACKUP_PHASES = [
    Phase.BEFORE_CONFIGURATION,
    Phase.AFTER_CONFIGURATION,
    Phase.MID_STREAM,
    Phase.DURING_FLUSH,
    Phase.BEFORE_CLOSE,
]
RESTORE_PHASES = [
    Phase.BEFORE_CONFIGURATION,
    Phase.AFTER_CONFIGURATION,
    Phase.MID_STREAM,
    Phase.DURING_CLEAR_ERROR,
    Phase.BEFORE_CLOSE,
]
MID = 4 * DEVICES  # data commands before a MID_STREAM fault


@pytest.fixture(scope="module")
def streams() -> list[bytes]:
    async def make() -> list[bytes]:
        client, _ = await backup(Registry(), DATA, DEVICES)
        return client.streams

    return anyio.run(make, backend="asyncio")


def check_client_saw(client: FakeClient, phase: Phase, last: CommandCode) -> None:
    """What the client got before the abort tells where the engine stopped."""
    assert client.aborted
    assert not any(client.closed)
    codes = client.codes
    if phase in (Phase.BEFORE_CONFIGURATION, Phase.AFTER_CONFIGURATION):
        assert all(not c for c in codes)
    if phase is Phase.MID_STREAM:
        data = CommandCode.WRITE if last is CommandCode.FLUSH else CommandCode.READ
        assert all(data in c for c in codes), "data was flowing on every device"
        assert all(last not in c for c in codes)
    if phase is Phase.DURING_FLUSH:
        assert all(c[-1] is CommandCode.FLUSH for c in codes)
    if phase is Phase.DURING_CLEAR_ERROR:
        assert any(c and c[-1] is CommandCode.CLEAR_ERROR for c in codes)
    if phase is Phase.BEFORE_CLOSE:
        assert all(c[-1] is last for c in codes)


@pytest.mark.parametrize("action", [Action.SIGNAL_ABORT, Action.RAISE])
@pytest.mark.parametrize("phase", BACKUP_PHASES)
async def test_backup_fail_points(registry: Registry, phase: Phase, action: Action) -> None:
    client = FakeClient(registry, DEVICES)
    point = FailPoint(phase, action, after_commands=MID)
    engine = StripedBackup(DATA, OPTIONS, fail_at=point)
    with pytest.raises(InjectedFaultError) as info:
        await run_job(engine, client, registry)
    assert info.value.point is point
    assert phase.value in str(info.value)
    assert client.name in str(info.value)
    check_client_saw(client, phase, CommandCode.FLUSH)


@pytest.mark.parametrize("action", [Action.SIGNAL_ABORT, Action.RAISE])
@pytest.mark.parametrize("phase", RESTORE_PHASES)
async def test_restore_fail_points(
    registry: Registry, streams: list[bytes], phase: Phase, action: Action
) -> None:
    client = FakeClient(registry, DEVICES, streams=streams)
    target = BytesConsumer()
    point = FailPoint(phase, action, after_commands=MID)
    engine = StripedRestore(target, OPTIONS, fail_at=point)
    with pytest.raises(InjectedFaultError):
        await run_job(engine, client, registry)
    assert target.discarded
    assert not target.finished
    check_client_saw(client, phase, CommandCode.CLEAR_ERROR)


@pytest.mark.parametrize("phase", BACKUP_PHASES)
async def test_backup_stall_ends_when_the_client_watchdog_aborts(
    registry: Registry, phase: Phase
) -> None:
    client = FakeClient(registry, DEVICES, timeout=0.2)
    engine = StripedBackup(DATA, OPTIONS, fail_at=FailPoint(phase, Action.STALL, MID))
    # Only the client's watchdog (0.2 s) ends the stall: wait for it, bounded.
    with (
        anyio.fail_after(10, reason="the client's watchdog did not end the stall"),
        pytest.raises(EngineAbortedError, match="client signalled abort"),
    ):
        await run_job(engine, client, registry)
    assert client.timed_out


@pytest.mark.parametrize("phase", [Phase.MID_STREAM, Phase.DURING_CLEAR_ERROR])
async def test_restore_stall_ends_when_the_client_watchdog_aborts(
    registry: Registry, streams: list[bytes], phase: Phase
) -> None:
    client = FakeClient(registry, DEVICES, streams=streams, timeout=0.2)
    engine = StripedRestore(BytesConsumer(), OPTIONS, fail_at=FailPoint(phase, Action.STALL, MID))
    with pytest.raises(EngineAbortedError):
        await run_job(engine, client, registry)
    assert client.timed_out


async def test_stall_ends_on_cancellation(registry: Registry) -> None:
    client = FakeClient(registry, DEVICES, timeout=30)
    engine = StripedBackup(DATA, OPTIONS, fail_at=FailPoint(Phase.MID_STREAM, Action.STALL))
    async with anyio.create_task_group() as tg:
        tg.start_soon(client.run)
        with anyio.move_on_after(0.2) as scope:
            await engine.run(client.name, registry=registry)
    assert scope.cancelled_caught
    assert client.aborted  # cancelling the engine aborted the set


async def test_cancelling_the_engine_aborts_and_closes(registry: Registry) -> None:
    client = FakeClient(registry, DEVICES, delay=0.005)
    engine = StripedBackup(DATA, OPTIONS)
    async with anyio.create_task_group() as tg:
        tg.start_soon(client.run)
        with anyio.move_on_after(0.05) as scope:
            await engine.run(client.name, registry=registry)
    assert scope.cancelled_caught
    assert client.aborted
    assert registry.names() == []  # both sides closed the set


@pytest.mark.parametrize(
    ("code", "nth"),
    [(CommandCode.WRITE, 0), (CommandCode.WRITE, 3), (CommandCode.FLUSH, 0)],
)
async def test_a_failed_command_names_device_and_code(
    registry: Registry, code: CommandCode, nth: int
) -> None:
    client = FakeClient(registry, DEVICES, fail=Fail(1, code, Completion.DISK_FULL, nth))
    with pytest.raises(CommandFailedError) as info:
        await run_job(StripedBackup(DATA, OPTIONS), client, registry)
    error = info.value
    assert error.code is code
    assert error.completion == Completion.DISK_FULL
    assert error.device == device_names(client.name, DEVICES)[1]
    assert "DISK_FULL (112)" in str(error)
    assert repr(error.device) in str(error)
    assert client.aborted


async def test_the_client_fails_the_backup_at_complete(registry: Registry) -> None:
    from vdistream import Features

    fail = Fail(2, CommandCode.COMPLETE, Completion.HANDLE_DISK_FULL)
    client = FakeClient(registry, DEVICES, features=Features.REQUEST_COMPLETE, fail=fail)
    with pytest.raises(CommandFailedError, match="COMPLETE completed with HANDLE_DISK_FULL"):
        await run_job(StripedBackup(DATA, OPTIONS), client, registry)
    assert client.aborted


async def test_a_failed_read(registry: Registry, streams: list[bytes]) -> None:
    client = FakeClient(
        registry, DEVICES, streams=streams, fail=Fail(0, CommandCode.READ, Completion.IO_DEVICE, 2)
    )
    with pytest.raises(CommandFailedError, match="READ completed with IO_DEVICE"):
        await run_job(StripedRestore(BytesConsumer(), OPTIONS), client, registry)
    assert client.aborted


async def test_a_short_read_reported_as_success(registry: Registry, streams: list[bytes]) -> None:
    fail = Fail(1, CommandCode.READ, Completion.SUCCESS, 1, bytes_transferred=BLOCK)
    client = FakeClient(registry, DEVICES, streams=streams, fail=fail)
    with pytest.raises(EngineError, match="short read must report HANDLE_EOF"):
        await run_job(StripedRestore(BytesConsumer(), OPTIONS), client, registry)
    assert client.aborted


async def test_a_filemark_is_a_failure(registry: Registry, streams: list[bytes]) -> None:
    fail = Fail(1, CommandCode.READ, Completion.FILEMARK_DETECTED, 1)
    client = FakeClient(registry, DEVICES, streams=streams, fail=fail)
    with pytest.raises(CommandFailedError, match="FILEMARK_DETECTED"):
        await run_job(StripedRestore(BytesConsumer(), OPTIONS), client, registry)


@pytest.mark.parametrize("direction", ["backup", "restore"])
async def test_the_client_aborts(registry: Registry, streams: list[bytes], direction: str) -> None:
    if direction == "backup":
        client = FakeClient(registry, DEVICES, abort_after=10)
        engine: StripedBackup | StripedRestore = StripedBackup(DATA, OPTIONS)
    else:
        client = FakeClient(registry, DEVICES, streams=streams, abort_after=10)
        engine = StripedRestore(BytesConsumer(), OPTIONS)
    with pytest.raises(EngineAbortedError, match="the client signalled abort") as info:
        await run_job(engine, client, registry)
    assert info.value.reason is not None


async def test_producer_failure(registry: Registry) -> None:
    calls = 0

    async def fill(view: memoryview) -> int:
        nonlocal calls
        calls += 1
        if calls == 5:
            raise OSError("disk on fire")
        view[:BLOCK] = bytes(BLOCK)
        return BLOCK

    client = FakeClient(registry, DEVICES)
    with pytest.raises(EngineError, match="the producer failed: OSError: disk on fire") as info:
        await run_job(StripedBackup(fill, OPTIONS), client, registry)
    assert isinstance(info.value.__cause__, OSError)
    assert client.aborted


async def test_consumer_failure(registry: Registry, streams: list[bytes]) -> None:
    async def write(view: memoryview) -> None:
        raise ValueError("no room")

    client = FakeClient(registry, DEVICES, streams=streams)
    with pytest.raises(EngineError, match="the consumer failed: ValueError: no room"):
        await run_job(StripedRestore(write, OPTIONS), client, registry)
    assert client.aborted


async def test_restore_needs_a_buffer_per_device(registry: Registry, streams: list[bytes]) -> None:
    options = StripingOptions(block_size=BLOCK, max_transfer_size=CHUNK, buffer_count=2)
    client = FakeClient(registry, DEVICES, streams=streams)
    with pytest.raises(EngineError, match="BUFFERCOUNT=2 is less than the 3 devices"):
        await run_job(StripedRestore(BytesConsumer(), options), client, registry)
    assert client.aborted


async def test_no_such_set(registry: Registry) -> None:
    with pytest.raises(EngineError, match="cannot open the set"):
        await StripedBackup(b"x").run("nobody-created-this", registry=registry)


async def test_the_client_never_opens_its_devices(registry: Registry) -> None:
    from vdistream import ClientVirtualDeviceSet, VDAbortError, VDConfig

    client = ClientVirtualDeviceSet(registry=registry)
    client.create("lazy", VDConfig(device_count=2))
    options = StripingOptions(block_size=BLOCK, max_transfer_size=CHUNK, open_timeout=0.1)
    with pytest.raises(EngineError, match=r"did not open every device within 0\.1 s"):
        await StripedBackup(b"x", options).run("lazy", registry=registry)
    with pytest.raises(VDAbortError):
        await client.get_configuration(0)
    client.close()


async def test_the_client_never_completes(registry: Registry) -> None:
    from vdistream import ClientVirtualDeviceSet, VDAbortError, VDConfig

    client = ClientVirtualDeviceSet(registry=registry)
    client.create("slow", VDConfig(device_count=1))
    options = StripingOptions(block_size=BLOCK, max_transfer_size=CHUNK, command_timeout=0.1)
    engine = StripedBackup(b"x", options)
    async with anyio.create_task_group() as tg:
        tg.start_soon(client.get_configuration, 5)
        await anyio.lowlevel.checkpoint()
        error: list[BaseException] = []

        async def run() -> None:
            try:
                await engine.run("slow", registry=registry)
            except EngineError as exc:
                error.append(exc)

        tg.start_soon(run)
        while client.state is not ClientState.INITIALIZING:  # noqa: ASYNC110 - test polling
            await anyio.sleep(0.001)
        device = client.open_device("slow")
        held = await device.get_command(5)  # taken, never completed
        assert held.code is CommandCode.WRITE
    assert "WRITE got no completion within 0.1 s" in str(error[0])
    with pytest.raises(VDAbortError):
        device.complete_command(held, Completion.SUCCESS, held.size)
    client.close()


async def test_an_engine_serves_one_job(registry: Registry) -> None:
    engine = StripedBackup(b"")
    with pytest.raises(EngineError):
        await engine.run("nothing", registry=registry)
    with pytest.raises(RuntimeError, match="one job"):
        await engine.run("nothing", registry=registry)


async def test_fail_points_must_fit_the_direction() -> None:
    with pytest.raises(ValueError, match="CLEAR_ERROR"):
        StripedBackup(b"", fail_at=FailPoint(Phase.DURING_CLEAR_ERROR))
    with pytest.raises(ValueError, match="FLUSH"):
        StripedRestore(BytesConsumer(), fail_at=FailPoint(Phase.DURING_FLUSH))
    with pytest.raises(ValueError):
        FailPoint(Phase.MID_STREAM, after_commands=-1)


async def test_after_an_engine_failure_the_server_side_is_closed(registry: Registry) -> None:
    client = FakeClient(registry, DEVICES)
    engine = StripedBackup(DATA, OPTIONS, fail_at=FailPoint(Phase.MID_STREAM, after_commands=6))
    with pytest.raises(InjectedFaultError):
        await run_job(engine, client, registry)
    assert registry.names() == []  # nothing of the set is left
