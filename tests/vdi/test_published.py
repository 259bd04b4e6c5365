"""What a set publishes instead of being reached into: ``statistics()`` and ``aborted_by``."""

from __future__ import annotations

import dataclasses

import anyio
import pytest

from tests.vdi.conftest import World, active, settle
from vdistream import CommandCode, Completion, VDProtocolError
from vdistream.protocol import SetAbortCause
from vdistream.vdi import SetStatistics

pytestmark = pytest.mark.asyncio


async def test_statistics_count_buffers_in_use_and_commands_outstanding_per_device(
    world: World,
) -> None:
    pair = await active(world, devices=2, buffers=4)
    assert pair.client.statistics() == SetStatistics(4, 0, (0, 0))
    write, spare = await pair.server.allocate_buffer(4096), await pair.server.allocate_buffer(512)
    sent = pair.sdevs[0].send_command(CommandCode.WRITE, size=4096, buffer=write)
    pair.sdevs[1].send_command(CommandCode.FLUSH)
    await world.sync()
    assert pair.client.statistics() == SetStatistics(4, 2, (1, 1))
    command = await pair.cdevs[0].get_command(0)
    assert pair.client.statistics().outstanding == (1, 1)  # taken, not yet completed
    pair.cdevs[0].complete_command(command, Completion.SUCCESS, 4096)
    assert (await sent).completion == Completion.SUCCESS
    assert pair.client.statistics().outstanding == (0, 1)
    pair.server.free_buffer(write)
    pair.server.free_buffer(spare)
    await world.sync()
    stats = pair.client.statistics()
    assert stats == SetStatistics(buffers_total=4, buffers_in_use=0, outstanding=(0, 1))
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.buffers_in_use = 3  # type: ignore[misc]


async def test_statistics_need_an_open_set(world: World) -> None:
    pair = await active(world)
    pair.client.signal_abort()
    pair.client.close()
    with pytest.raises(VDProtocolError):
        pair.client.statistics()


@pytest.mark.parametrize(
    ("side", "cause"), [("client", SetAbortCause.CLIENT), ("server", SetAbortCause.SERVER)]
)
async def test_the_set_records_who_aborted_it(
    world: World, side: str, cause: SetAbortCause
) -> None:
    pair = await active(world, devices=2)
    assert (pair.client.aborted_by, pair.server.aborted_by) == (None, None)
    (pair.client if side == "client" else pair.server).signal_abort()
    await world.sync()
    (pair.server if side == "client" else pair.client).signal_abort()  # a later one: no change
    await world.sync()
    assert pair.client.aborted_by is cause
    assert pair.server.aborted_by is cause


async def test_the_set_records_its_watchdog_as_the_cause(world: World) -> None:
    pair = await active(world, server_timeout_ms=30)
    pending = pair.sdevs[0].send_command(CommandCode.FLUSH)
    await world.sync()
    await pair.cdevs[0].get_command(0)  # taken, never completed
    with anyio.fail_after(5):
        assert (await pending).completion == Completion.OPERATION_ABORTED
    await world.sync()
    assert pair.client.aborted_by is SetAbortCause.SERVER_TIMEOUT
    assert pair.server.aborted_by is SetAbortCause.SERVER_TIMEOUT


async def test_a_premature_close_is_recorded_as_that_sides_abort(world: World) -> None:
    pair = await active(world)
    with pytest.raises(VDProtocolError):
        await settle(pair.server.close())
    await world.sync()
    assert pair.client.aborted_by is SetAbortCause.SERVER
