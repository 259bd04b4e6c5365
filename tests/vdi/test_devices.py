"""Opening devices by name (api.md decision 1) and the per-device command stream."""

from __future__ import annotations

import anyio
import pytest

from tests.vdi.conftest import World, active, configured, settle
from vdistream import (
    ClientState,
    CommandCode,
    Completion,
    VDClosedError,
    VDInvalidError,
    VDOpenError,
    VDProtocolError,
    VDTimeoutError,
)
from vdistream.vdi.core import MAX_QUEUED

pytestmark = pytest.mark.asyncio


async def test_device_names_claim_slots_across_sides(world: World) -> None:
    pair = await configured(world, devices=2)
    c_b = pair.client.open_device("b")
    s_a = await settle(pair.server.open_device("a"))
    s_b = await settle(pair.server.open_device("b"))
    if not world.xproc:  # one process: the very same device object
        assert s_b.core is c_b.core  # the other side opening the same name gets that device
        assert s_a.core is not c_b.core
    with pytest.raises(VDOpenError, match="every device"):
        await settle(pair.server.open_device("a"))  # every server device is open: OPEN first
    with pytest.raises(VDProtocolError, match="already open"):
        pair.client.open_device("b")
    with pytest.raises(VDInvalidError, match="no device 'c'"):
        pair.client.open_device("c")
    pair.client.open_device("a")
    assert pair.client.state is ClientState.ACTIVE
    with pytest.raises(VDOpenError):
        pair.client.open_device("a")
    with pytest.raises(VDOpenError):
        await settle(pair.server.open_device("zzz"))


@pytest.mark.inproc_only("the client side alone: no engine side to move")
async def test_open_device_before_configuration_is_a_protocol_error() -> None:
    # the client alone: nothing to run in another process
    from vdistream import ClientVirtualDeviceSet, Registry, VDConfig

    client = ClientVirtualDeviceSet(registry=Registry())
    client.create("db", VDConfig())
    with pytest.raises(VDProtocolError) as info:
        client.open_device("db")
    assert "CONFIGURABLE" in str(info.value)


async def test_fifo_order_several_outstanding_completed_in_any_order(world: World) -> None:
    pair = await active(world, buffers=4)
    sdev, cdev = pair.sdevs[0], pair.cdevs[0]
    bufs = [await pair.server.allocate_buffer(65536) for _ in range(4)]
    for i, buf in enumerate(bufs):
        buf[:1] = bytes([i])
    pendings = [
        sdev.send_command(CommandCode.WRITE, 512 * (i + 1), buffer=buf)
        for i, buf in enumerate(bufs)
    ]
    await world.sync()
    commands = [await cdev.get_command(0) for _ in range(4)]
    assert [c.buffer[0] for c in commands if c.buffer is not None] == [0, 1, 2, 3]
    assert [c.size for c in commands] == [512, 1024, 1536, 2048]
    for command in reversed(commands):
        cdev.complete_command(command, Completion.SUCCESS, command.size)
    results = [await p for p in pendings]
    assert [r.bytes_transferred for r in results] == [512, 1024, 1536, 2048]
    assert all(r.completion == 0 for r in results)


async def test_write_buffers_are_read_only_and_read_buffers_zero_copy(world: World) -> None:
    pair = await active(world)
    sdev, cdev = pair.sdevs[0], pair.cdevs[0]
    buf = await pair.server.allocate_buffer(4096)
    buf[:] = b"w" * 4096
    sdev.send_command(CommandCode.WRITE, 4096, buffer=buf)
    await world.sync()
    write = await cdev.get_command(0)
    assert write.buffer is not None
    assert write.buffer.readonly
    assert bytes(write.buffer) == b"w" * 4096
    with pytest.raises(TypeError):
        write.buffer[0] = 1  # type: ignore[index]
    cdev.complete_command(write, 0, 4096)
    pending = sdev.send_command(CommandCode.READ, 1000, buffer=buf[100:])
    await world.sync()
    read = await cdev.get_command(0)
    assert read.buffer is not None
    assert not read.buffer.readonly
    assert read.buffer.nbytes == 1000
    read.buffer[:] = b"r" * 1000
    cdev.complete_command(read, 0, 1000)
    assert (await pending).bytes_transferred == 1000
    # the server sees the client's bytes in place: nothing was copied
    assert bytes(buf[:100]) == b"w" * 100
    assert bytes(buf[100:1100]) == b"r" * 1000
    assert bytes(buf[1100:]) == b"w" * (4096 - 1100)


async def test_completed_command_buffer_is_released(world: World) -> None:
    pair = await active(world)
    buf = await pair.server.allocate_buffer(512)
    pair.sdevs[0].send_command(CommandCode.WRITE, 512, buffer=buf)
    await world.sync()
    command = await pair.cdevs[0].get_command(0)
    assert command.buffer is not None
    pair.cdevs[0].complete_command(command, 0, 512)
    with pytest.raises(ValueError):
        bytes(command.buffer)


async def test_complete_command_refusals_change_nothing(world: World) -> None:
    pair = await active(world, devices=2)
    buf = await pair.server.allocate_buffer(512)
    pending = pair.sdevs[0].send_command(CommandCode.WRITE, 512, buffer=buf)
    await world.sync()
    command = await pair.cdevs[0].get_command(0)
    with pytest.raises(VDInvalidError, match="not an outstanding command"):
        pair.cdevs[1].complete_command(command, 0, 512)  # another device's command
    with pytest.raises(VDInvalidError, match="bytes_transferred"):
        pair.cdevs[0].complete_command(command, 0, 513)
    with pytest.raises(VDInvalidError, match="completion code"):
        pair.cdevs[0].complete_command(command, -1)
    await world.sync()
    assert not pending.done()
    pair.cdevs[0].complete_command(command, 0, 512)
    assert (await pending).bytes_transferred == 512
    with pytest.raises(VDInvalidError, match="not an outstanding command"):
        pair.cdevs[0].complete_command(command, 0, 512)  # twice


async def test_get_command_timeout_and_poll(world: World) -> None:
    pair = await active(world)
    started = anyio.current_time()
    with pytest.raises(VDTimeoutError) as info:
        await pair.cdevs[0].get_command(0.05)
    assert anyio.current_time() - started >= 0.04
    assert pair.name in str(info.value)
    assert "device" in str(info.value)
    with pytest.raises(VDTimeoutError):
        await pair.cdevs[0].get_command(0)
    assert pair.client.state is ClientState.ACTIVE
    pair.sdevs[0].send_command(CommandCode.FLUSH)
    await world.sync()
    assert (await pair.cdevs[0].get_command(0)).code is CommandCode.FLUSH


async def test_close_device_is_a_marker_in_the_queue(world: World) -> None:
    pair = await active(world, devices=2)
    sdev, cdev = pair.sdevs[0], pair.cdevs[0]
    first = sdev.send_command(CommandCode.FLUSH)
    second = sdev.send_command(CommandCode.FLUSH)
    await world.sync()
    held = await cdev.get_command(0)
    await settle(sdev.close_device())
    assert (await pair.sdevs[0].send_command(CommandCode.FLUSH)).completion == 6
    with pytest.raises(VDClosedError):
        await settle(sdev.close_device())
    assert (await cdev.get_command(0)).code is CommandCode.FLUSH  # sent before the close
    with pytest.raises(VDClosedError):
        await cdev.get_command(0)
    with pytest.raises(VDClosedError):
        await cdev.get_command(0)  # the device stays closed
    await settle(pair.sdevs[1].close_device())
    with pytest.raises(VDClosedError):
        await pair.cdevs[1].get_command(0)
    assert pair.client.state is ClientState.NORMALLY_TERMINATED
    # decision 8: commands delivered before the close may still be completed
    cdev.complete_command(held, 0)
    assert (await first).completion == 0
    await world.sync()
    assert not second.done()
    with pytest.raises(VDProtocolError):
        cdev.complete_command(held, 0)  # gone: in NORMALLY_TERMINATED the table says PROTOCOL
    with pytest.raises(VDProtocolError):
        await cdev.get_command(0)


async def test_send_command_argument_errors_raise(world: World) -> None:
    pair = await active(world)
    sdev = pair.sdevs[0]
    buf = await pair.server.allocate_buffer(512)
    with pytest.raises(VDInvalidError, match="unknown command code"):
        sdev.send_command(99)
    with pytest.raises(VDInvalidError, match="needs a buffer"):
        sdev.send_command(CommandCode.READ, 512)
    with pytest.raises(VDInvalidError, match="needs a buffer"):
        sdev.send_command(CommandCode.WRITE, 512, buffer=memoryview(bytearray(512)))
    with pytest.raises(VDInvalidError, match="exceeds"):
        sdev.send_command(CommandCode.WRITE, 1024, buffer=buf)
    await world.sync()
    with pytest.raises(TimeoutError):
        with anyio.fail_after(0.02):
            await pair.cdevs[0].get_command(None)  # nothing was queued by the refusals


async def test_queue_bound_refuses_with_no_system_resources(world: World) -> None:
    pair = await active(world)
    pendings = [pair.sdevs[0].send_command(CommandCode.FLUSH) for _ in range(MAX_QUEUED)]
    over = pair.sdevs[0].send_command(CommandCode.FLUSH)
    await world.sync()
    assert over.done()
    assert over.result().completion == Completion.NO_SYSTEM_RESOURCES
    assert not any(p.done() for p in pendings)


async def test_positions_travel_both_ways(world: World) -> None:
    from vdistream import Features, Whence

    pair = await active(world, features=Features.LIKE_DISK)
    sdev, cdev = pair.sdevs[0], pair.cdevs[0]
    pending = sdev.send_command(CommandCode.SET_POSITION, Whence.CURRENT, -4096)
    await world.sync()
    command = await cdev.get_command(0)
    assert (command.code, command.size, command.position) == (
        CommandCode.SET_POSITION,
        Whence.CURRENT,
        -4096,
    )
    cdev.complete_command(command, 0, 0, 8192)
    assert (await pending).position == 8192
