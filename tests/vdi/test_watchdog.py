"""The server timeout watchdog (api.md decision 10, spec §5.5)."""

from __future__ import annotations

import anyio
import pytest

from tests.vdi.conftest import World, active
from vdistream import ClientState, CommandCode, Completion, VDAbortError

pytestmark = pytest.mark.asyncio


async def test_pending_command_without_completion_aborts_after_two_intervals(
    world: World,
) -> None:
    pair = await active(world, server_timeout_ms=50)
    started = anyio.current_time()
    pending = pair.sdevs[0].send_command(CommandCode.FLUSH)
    await world.sync()
    await pair.cdevs[0].get_command(0)  # taken, never completed
    # Bounded wait for the watchdog; only the lower bound is timing (never early).
    with anyio.fail_after(10, reason="the server timeout never aborted the set"):
        result = await pending
    elapsed = anyio.current_time() - started
    assert result.completion == Completion.OPERATION_ABORTED
    assert elapsed >= 0.09  # two intervals of 50 ms
    await world.sync()
    assert pair.client.state is ClientState.ABORTED
    assert "server timeout" in (pair.client.abort_reason or "")
    with pytest.raises(VDAbortError, match="server timeout"):
        await pair.cdevs[0].get_command(0)


async def test_a_waiting_client_runs_the_watchdog_too(world: World) -> None:
    pair = await active(world, devices=2, server_timeout_ms=30)
    pair.sdevs[0].send_command(CommandCode.FLUSH)  # device 0's command is never taken
    with anyio.fail_after(2), pytest.raises(VDAbortError, match="server timeout"):
        await pair.cdevs[1].get_command(None)


async def test_completions_restart_the_clock(world: World) -> None:
    pair = await active(world, server_timeout_ms=200)
    sdev, cdev = pair.sdevs[0], pair.cdevs[0]
    pending = sdev.send_command(CommandCode.FLUSH)
    # 3 x 250 ms > 2 x 200 ms, but never 400 ms without a completion: 150 ms of slack
    # per step, so a loaded machine does not fire the watchdog by accident.
    for _ in range(3):
        nxt = sdev.send_command(CommandCode.FLUSH)
        await anyio.sleep(0.25)
        await world.sync()
        cdev.complete_command(await cdev.get_command(0), 0)
        assert (await pending).completion == 0
        pending = nxt
    assert pair.client.state is ClientState.ACTIVE


async def test_no_pending_command_no_abort(world: World) -> None:
    pair = await active(world, server_timeout_ms=10)
    await anyio.sleep(0.1)
    with pytest.raises(TimeoutError), anyio.fail_after(0.05):
        await pair.cdevs[0].get_command(None)
    assert pair.client.state is ClientState.ACTIVE


async def test_zero_means_no_watchdog(world: World) -> None:
    pair = await active(world, server_timeout_ms=0)
    pending = pair.sdevs[0].send_command(CommandCode.FLUSH)
    with pytest.raises(TimeoutError), anyio.fail_after(0.1):
        await pending
    assert pair.client.state is ClientState.ACTIVE
