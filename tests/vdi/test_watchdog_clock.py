"""The server-timeout watchdog and the waits around it, and the buffer area's release.

A pump idle in ``get_command`` on one device while a command waits on another is the
only waiter of the set; the watchdog must still fire for it (``SetCore.command_added``
wakes every waiter when the clock starts), with no poll to help. The clock runs while
any command is pending and only then; a pending command's own wait keeps its timeout;
the area outlives a client that closes first. (The later tests kill mutation survivors
of ``vdistream/vdi/core.py``: ``scripts/mutation``.)
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import anyio
import pytest

from tests.coordinator.faults import Faults, FaultyStorage
from tests.vdi.conftest import World, active
from vdistream.coordinator import AbortCause, Job, JobKind, JobOptions, JobStatus
from vdistream.engines import Direction, Engine, EngineResult, device_names
from vdistream.errors import VDAbortError, VDIError, VDTimeoutError
from vdistream.protocol import ClientState, CommandCode, Features
from vdistream.storage import FileStorage
from vdistream.vdi import Registry, ServerVirtualDeviceSet

pytestmark = pytest.mark.asyncio
BLOCK = 65536


async def test_a_client_waiting_before_the_clock_starts_runs_the_watchdog(world: World) -> None:
    pair = await active(world, devices=2, server_timeout_ms=30)
    got: list[BaseException] = []

    async def waiter() -> None:
        try:
            await pair.cdevs[1].get_command(None)
        except VDAbortError as exc:
            got.append(exc)

    with anyio.fail_after(5, reason="the waiting client never ran the watchdog"):
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.sleep(0.05)  # the client waits on device 1 by now
            pair.sdevs[0].send_command(CommandCode.FLUSH)  # never taken on device 0
    assert "server timeout" in str(got[0])


class _BusyEngine(Engine):
    """Sends one WRITE on device 0 of 2, then is busy elsewhere: it waits on nothing of
    the set, so only the pumps can run the watchdog."""

    direction = Direction.BACKUP

    async def run(self, set_name: str, *, registry: Registry | None = None) -> EngineResult:
        sds = ServerVirtualDeviceSet(registry=registry)
        sds.open(None, set_name)
        count = sds.get_configuration().device_count
        sds.begin_configuration(Features.WRITE_MEDIA, 4096, 0, BLOCK)
        sds.request_buffers(BLOCK, 0, count)
        sds.end_configuration()
        devices = [sds.open_device(name) for name in device_names(set_name, count)]
        await sds.wait_active(5)
        await anyio.sleep(0.2)  # the pumps wait for commands now
        buffer = await sds.allocate_buffer(BLOCK)
        devices[0].send_command(CommandCode.WRITE, BLOCK, 0, buffer)
        try:
            await anyio.sleep_forever()
        finally:
            sds.signal_abort()
            sds.close()
        raise AssertionError("unreachable")


async def test_the_server_timeout_ends_a_job_whose_stall_watchdog_is_off(tmp_path: Path) -> None:
    faults = Faults(hang_write_after_bytes=0)
    job = Job(
        JobKind.BACKUP,
        _BusyEngine(),
        FaultyStorage(FileStorage(tmp_path), faults),
        backup_id="busy",
        registry=Registry(),
        options=JobOptions(devices=2, server_timeout_ms=100, stall_timeout=0, drain_timeout=5),
    )
    with anyio.fail_after(15, reason="nothing ended the job: the server timeout never fired"):
        result = await job.run()
    assert result.status is JobStatus.FAILED
    assert result.aborted_by is AbortCause.SERVER_TIMEOUT
    assert faults.commits_started == 0
    # No stream, whole or partial, is left (the destination's directories may be).
    assert [name for _, _, files in os.walk(tmp_path) for name in files] == []


async def test_the_clock_stops_once_every_pending_command_completed(world: World) -> None:
    """Two commands pending on two devices, both completed: nothing is pending, so a
    long idle spell (many intervals) is no server timeout. The clock starts again with
    the next command, and fires when that one is never completed."""
    pair = await active(world, devices=2, server_timeout_ms=20)
    first = [pair.sdevs[i].send_command(CommandCode.FLUSH) for i in (0, 1)]
    await world.sync()
    for i in (0, 1):
        pair.cdevs[i].complete_command(await pair.cdevs[i].get_command(0), 0)
    for pending in first:
        assert (await pending).completion == 0
    await anyio.sleep(0.2)  # 10 intervals with nothing pending
    with pytest.raises(TimeoutError), anyio.fail_after(0.05):
        await pair.cdevs[0].get_command(None)
    assert pair.client.state is ClientState.ACTIVE
    pair.sdevs[1].send_command(CommandCode.FLUSH)  # never taken
    with anyio.fail_after(5), pytest.raises(VDAbortError, match="server timeout"):
        await pair.cdevs[0].get_command(None)


async def test_the_clock_runs_while_any_command_is_pending(world: World) -> None:
    """Two commands pending; one completes, the other never does: still a timeout."""
    pair = await active(world, devices=2, server_timeout_ms=20)
    pair.sdevs[0].send_command(CommandCode.FLUSH)
    pair.sdevs[1].send_command(CommandCode.FLUSH)  # never completed
    await world.sync()
    pair.cdevs[0].complete_command(await pair.cdevs[0].get_command(0), 0)
    with anyio.fail_after(5), pytest.raises(VDAbortError, match="server timeout"):
        await pair.cdevs[0].get_command(None)


async def test_a_pending_commands_wait_keeps_its_own_timeout(world: World) -> None:
    """``PendingCommand.wait(timeout)``: a command never completed is a VDTimeoutError
    naming what timed out, and the set goes on (no watchdog here)."""
    pair = await active(world, server_timeout_ms=0)
    pending = pair.sdevs[0].send_command(CommandCode.FLUSH)
    with anyio.fail_after(5), pytest.raises(VDTimeoutError, match="command result: timed out"):
        await pending.wait(0.05)
    assert pair.client.state is ClientState.ACTIVE


async def test_the_server_keeps_its_buffers_until_it_closes_too(world: World) -> None:
    """The buffer area is released only when both sides are gone: a client that
    closes first (an abort) leaves the server's buffers readable and writable, since
    its threads may still be copying into them."""
    pair = await active(world, server_timeout_ms=0)
    buffer = await pair.server.allocate_buffer(4096)
    with contextlib.suppress(VDIError):
        pair.client.close()
    buffer[:4] = b"vdi!"
    assert bytes(buffer[:4]) == b"vdi!"
