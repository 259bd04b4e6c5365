"""The abort rules of api.md ("Abort, the seed document, restated"), one test each."""

from __future__ import annotations

import anyio
import pytest

from tests.vdi.conftest import World, active, configured, settle
from vdistream import (
    ClientState,
    ClientVirtualDeviceSet,
    CommandCode,
    CommandResult,
    Completion,
    ServerState,
    VDAbortError,
    VDConfig,
    VDOpenError,
    VDProtocolError,
)

pytestmark = pytest.mark.asyncio

ABORTED = CommandResult(Completion.OPERATION_ABORTED)


@pytest.mark.parametrize("side", ["client", "server"])
async def test_abort_from_either_side_aborts_the_whole_set_at_once(world: World, side: str) -> None:
    pair = await active(world, devices=3)
    (pair.client if side == "client" else pair.server).signal_abort()
    await world.sync()
    assert pair.client.state is ClientState.ABORTED
    assert pair.server.state is ServerState.ABORTED
    assert f"the {side} signalled abort" in (pair.client.abort_reason or "")


async def test_every_waiting_call_on_every_device_wakes_with_abort(world: World) -> None:
    pair = await active(world, devices=4, buffers=1)
    held = await pair.server.allocate_buffer(65536)
    assert held
    pending = pair.sdevs[0].send_command(CommandCode.FLUSH)
    await world.sync()
    woken: list[str] = []

    async def expect_abort(label: str, call: object) -> None:
        with pytest.raises(VDAbortError) as info:
            await call  # type: ignore[misc]
        assert "aborted" in str(info.value)
        woken.append(label)

    outstanding = await pair.cdevs[0].get_command(0)
    assert outstanding.code is CommandCode.FLUSH
    with anyio.fail_after(2):
        async with anyio.create_task_group() as tg:
            for i, cdev in enumerate(pair.cdevs):
                tg.start_soon(expect_abort, f"get_command {i}", cdev.get_command(None))
            tg.start_soon(expect_abort, "allocate_buffer", pair.server.allocate_buffer(512))
            await anyio.sleep(0.02)
            assert woken == []
            pair.client.signal_abort()
    assert sorted(woken) == sorted([f"get_command {i}" for i in range(4)] + ["allocate_buffer"])
    assert await pending == ABORTED


async def test_waiting_get_configuration_wakes_with_abort(world: World) -> None:
    client = ClientVirtualDeviceSet(registry=world.registry)
    client.create("db", VDConfig())
    server = world.server_set()
    await settle(server.open(None, "db"))
    with anyio.fail_after(2):
        async with anyio.create_task_group() as tg:

            async def wait() -> None:
                with pytest.raises(VDAbortError):
                    await client.get_configuration(None)

            tg.start_soon(wait)
            await anyio.sleep(0.01)
            server.signal_abort()
    with pytest.raises(VDAbortError):
        await client.get_configuration(0)
    with pytest.raises(VDAbortError):
        server.get_configuration()


async def test_waiting_wait_active_wakes_with_abort(world: World) -> None:
    pair = await configured(world)
    with anyio.fail_after(2):
        async with anyio.create_task_group() as tg:

            async def wait() -> None:
                with pytest.raises(VDAbortError):
                    await pair.server.wait_active(None)

            tg.start_soon(wait)
            await anyio.sleep(0.01)
            pair.client.signal_abort()


async def test_no_further_commands_are_handed_out(world: World) -> None:
    pair = await active(world)
    queued = [pair.sdevs[0].send_command(CommandCode.FLUSH) for _ in range(3)]
    pair.server.signal_abort()
    await world.sync()
    with pytest.raises(VDAbortError):
        await pair.cdevs[0].get_command(0)
    assert [await q for q in queued] == [ABORTED] * 3
    late = pair.sdevs[0].send_command(CommandCode.FLUSH)
    assert late.done()
    assert late.result() == ABORTED


async def test_outstanding_commands_complete_for_the_server_with_operation_aborted(
    world: World,
) -> None:
    pair = await active(world, devices=2)
    pendings = [sdev.send_command(CommandCode.FLUSH) for sdev in pair.sdevs]
    await world.sync()
    held = [await cdev.get_command(0) for cdev in pair.cdevs]
    await world.sync()
    assert not any(p.done() for p in pendings)
    pair.client.signal_abort()
    await world.sync()
    assert all(p.done() for p in pendings)
    assert [p.result() for p in pendings] == [ABORTED, ABORTED]
    assert len(held) == 2


async def test_late_complete_command_raises_and_has_no_effect(world: World) -> None:
    pair = await active(world)
    buf = await pair.server.allocate_buffer(512)
    pending = pair.sdevs[0].send_command(CommandCode.READ, 512, buffer=buf)
    await world.sync()
    command = await pair.cdevs[0].get_command(0)
    pair.server.signal_abort()
    await world.sync()
    with pytest.raises(VDAbortError):
        pair.cdevs[0].complete_command(command, Completion.SUCCESS, 512)
    assert pending.result() == ABORTED


async def test_client_buffers_stay_valid_until_close_then_are_released(
    world: World,
) -> None:
    pair = await active(world, prefix_zone_size=64)
    buf = await pair.server.allocate_buffer(512)
    pair.sdevs[0].send_command(CommandCode.READ, 512, buffer=buf)
    await world.sync()
    command = await pair.cdevs[0].get_command(0)
    assert command.buffer is not None
    assert command.prefix is not None
    handle = pair.client.get_buffer_handle(command.buffer)
    mapped = pair.client.map_buffer_handle(handle)
    pair.server.signal_abort()
    await world.sync()
    # the I/O on a held buffer may still finish after the abort
    command.buffer[:] = b"x" * 512
    command.prefix[:4] = b"head"
    assert bytes(mapped[:3]) == b"xxx"
    assert pair.client.close() is None
    for view in (command.buffer, command.prefix, mapped):
        with pytest.raises(ValueError):
            bytes(view)


async def test_after_abort_allocate_raises_free_and_close_device_do_nothing(
    world: World,
) -> None:
    pair = await active(world)
    buf = await pair.server.allocate_buffer(512)
    pair.client.signal_abort()
    await world.sync()
    with pytest.raises(VDAbortError):
        await pair.server.allocate_buffer(512)
    assert pair.server.free_buffer(buf) is None
    assert await settle(pair.sdevs[0].close_device()) is None
    assert await settle(pair.server.close()) is None
    with pytest.raises(ValueError):
        bytes(buf)  # the server's views are released by its close


async def test_signal_abort_is_idempotent_and_not_allowed_before_create(
    world: World,
) -> None:
    client = ClientVirtualDeviceSet(registry=world.registry)
    with pytest.raises(VDProtocolError):
        client.signal_abort()
    with pytest.raises(VDProtocolError):
        world.server_set().signal_abort()
    pair = await active(world)
    pair.client.signal_abort()
    reason = pair.client.abort_reason
    pair.client.signal_abort()
    pair.server.signal_abort()
    await world.sync()
    assert pair.client.abort_reason == reason
    assert pair.client.close() is None
    assert await settle(pair.server.close()) is None


async def test_client_close_with_open_devices_aborts_releases_then_raises(
    world: World,
) -> None:
    pair = await active(world, devices=2)
    pending = pair.sdevs[1].send_command(CommandCode.FLUSH)
    with pytest.raises(VDOpenError) as info:
        pair.client.close()
    assert pair.name in str(info.value)
    assert pair.client.state is ClientState.DNE
    await world.sync()
    assert pair.server.state is ServerState.ABORTED
    assert await pending == ABORTED
    assert world.registry.lookup(None, pair.name) is None  # the name is free again
    assert await settle(pair.server.close()) is None


async def test_client_close_before_configuration_aborts_the_server(world: World) -> None:
    client = ClientVirtualDeviceSet(registry=world.registry)
    client.create("db", VDConfig())
    server = world.server_set()
    await settle(server.open(None, "db"))
    assert client.close() is None  # no device was open
    await world.sync()
    assert server.state is ServerState.ABORTED
    with pytest.raises(VDAbortError):
        server.get_configuration()


async def test_server_close_with_open_devices_aborts_releases_then_raises(
    world: World,
) -> None:
    pair = await active(world)
    with pytest.raises(VDProtocolError, match="still open"):
        await settle(pair.server.close())
    await world.sync()
    assert pair.client.state is ClientState.ABORTED
    with pytest.raises(VDAbortError):
        await pair.cdevs[0].get_command(0)
    assert pair.client.close() is None


async def test_device_calls_after_close_are_protocol_errors(world: World) -> None:
    pair = await active(world)
    pair.client.signal_abort()
    pair.client.close()
    with pytest.raises(VDProtocolError):
        await pair.cdevs[0].get_command(0)
    with pytest.raises(VDProtocolError):
        pair.client.close()
