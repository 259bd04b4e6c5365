"""The buffer area: alignment, prefix zones, exhaustion, handles, release."""

from __future__ import annotations

import anyio
import pytest

from tests.vdi.conftest import World, active, address, configured, settle
from vdistream import (
    CommandCode,
    VDInvalidError,
    VDMemoryError,
)

pytestmark = pytest.mark.asyncio


@pytest.mark.parametrize(
    ("client_alignment", "block_size", "server_alignment", "requested", "expected"),
    [
        (0, 512, 0, 0, 512),
        (4096, 512, 0, 0, 4096),
        (0, 512, 8192, 0, 8192),
        (1024, 512, 0, 65536, 65536),
        (65536, 4096, 0, 0, 65536),
    ],
)
async def test_data_starts_honour_both_sides_alignment(
    world: World,
    client_alignment: int,
    block_size: int,
    server_alignment: int,
    requested: int,
    expected: int,
) -> None:
    pair = await configured(
        world,
        alignment=client_alignment,
        block_size=block_size,
        server_alignment=server_alignment,
        prefix_zone_size=100,
        buffers=0,
    )
    await settle(pair.server.request_buffers(3000, requested, 8))
    views = [await pair.server.allocate_buffer(3000, requested) for _ in range(8)]
    for view in views:
        # in the engine's process: both sides map each segment at a 64 KiB boundary
        assert world.address(view) % expected == 0


async def test_prefix_zone_sits_just_before_the_data(world: World) -> None:
    pair = await active(world, prefix_zone_size=48, alignment=4096, buffers=3)
    bufs = [await pair.server.allocate_buffer(65536) for _ in range(3)]
    for buf in bufs:
        buf[:] = b"d" * 65536
    for buf in bufs:
        pending = pair.sdevs[0].send_command(CommandCode.READ, 65536, buffer=buf)
        await world.sync()
        command = await pair.cdevs[0].get_command(0)
        assert command.prefix is not None
        assert command.buffer is not None
        assert command.prefix.nbytes == 48
        assert not command.prefix.readonly
        assert address(command.prefix) + 48 == address(command.buffer)
        command.prefix[:] = b"p" * 48  # the client's own header space
        pair.cdevs[0].complete_command(command, 0, 65536)
        await pending
    # writing every prefix zone touched no data byte of any buffer
    assert all(bytes(buf) == b"d" * 65536 for buf in bufs)


async def test_no_prefix_zone_when_none_was_asked(world: World) -> None:
    pair = await active(world)
    buf = await pair.server.allocate_buffer(512)
    pair.sdevs[0].send_command(CommandCode.WRITE, 512, buffer=buf)
    await world.sync()
    assert (await pair.cdevs[0].get_command(0)).prefix is None


async def test_exhaustion_waits_and_the_area_never_grows(world: World) -> None:
    pair = await active(world, buffers=2)
    area = pair.client._core.area  # type: ignore[union-attr]  # the one both sides map
    size = area.total_bytes
    a = await pair.server.allocate_buffer(65536)
    b = await pair.server.allocate_buffer(1000)
    assert await settle(pair.server.query_available_buffers(1)) == 0
    with pytest.raises(TimeoutError), anyio.fail_after(0.05):
        await pair.server.allocate_buffer(512)
    got: list[memoryview] = []
    async with anyio.create_task_group() as tg:

        async def wait() -> None:
            got.append(await pair.server.allocate_buffer(512))

        tg.start_soon(wait)
        await anyio.sleep(0.01)
        assert got == []
        pair.server.free_buffer(b)
    assert world.address(got[0]) != world.address(a)
    assert area.total_bytes == size
    with pytest.raises(ValueError):
        bytes(b)  # a freed buffer's view is released


async def test_allocation_that_can_never_fit_fails_at_once(world: World) -> None:
    pair = await active(world, buffers=2)
    with pytest.raises(VDMemoryError, match="no buffer of 65537 bytes"):
        await pair.server.allocate_buffer(65537)
    with pytest.raises(VDInvalidError):
        await pair.server.allocate_buffer(512, 3)
    with pytest.raises(VDInvalidError):
        await pair.server.allocate_buffer(0)


async def test_free_buffer_refusals(world: World) -> None:
    pair = await active(world)
    with pytest.raises(VDInvalidError, match="not a buffer allocated"):
        pair.server.free_buffer(memoryview(bytearray(512)))
    buf = await pair.server.allocate_buffer(512)
    pending = pair.sdevs[0].send_command(CommandCode.WRITE, 512, buffer=buf)
    with pytest.raises(VDInvalidError, match="outstanding command"):
        pair.server.free_buffer(buf)
    await world.sync()
    command = await pair.cdevs[0].get_command(0)
    pair.cdevs[0].complete_command(command, 0, 512)
    await pending
    pair.server.free_buffer(buf)
    with pytest.raises(ValueError):
        pair.server.free_buffer(buf)  # the released view cannot even be located


async def test_is_shared_buffer(world: World) -> None:
    pair = await active(world)
    buf = await pair.server.allocate_buffer(4096)
    assert pair.server.is_shared_buffer(buf)
    assert pair.server.is_shared_buffer(buf[100:200])
    assert not pair.server.is_shared_buffer(memoryview(bytearray(4096)))
    assert not pair.server.is_shared_buffer(b"bytes")


async def test_buffer_handles_map_the_same_bytes(world: World) -> None:
    pair = await active(world)
    buf = await pair.server.allocate_buffer(1024)
    pending = pair.sdevs[0].send_command(CommandCode.READ, 1024, buffer=buf)
    await world.sync()
    command = await pair.cdevs[0].get_command(0)
    assert command.buffer is not None
    handle = pair.client.get_buffer_handle(command.buffer)
    assert isinstance(handle, int)
    mapped = pair.client.map_buffer_handle(handle)
    mapped[:5] = b"hello"
    assert bytes(command.buffer[:5]) == b"hello"
    assert bytes(buf[:5]) == b"hello"
    with pytest.raises(VDInvalidError):
        pair.client.get_buffer_handle(memoryview(bytearray(10)))
    with pytest.raises(VDInvalidError):
        pair.client.map_buffer_handle(handle + 1000)
    pair.cdevs[0].complete_command(command, 0, 1024)
    await pending
    with pytest.raises(ValueError):
        bytes(mapped)  # the handle's view went with the command
    with pytest.raises(VDInvalidError):
        pair.client.map_buffer_handle(handle)


async def test_request_buffers_after_configuration_adds_a_segment(world: World) -> None:
    pair = await active(world, buffers=1)
    area = pair.client._core.area  # type: ignore[union-attr]  # the one both sides map
    await pair.server.allocate_buffer(65536)
    before = area.total_bytes
    await settle(pair.server.request_buffers(131072, 0, 1))
    big = await pair.server.allocate_buffer(131072)
    assert big.nbytes == 131072
    assert area.total_bytes > before


async def test_server_close_releases_its_views(world: World) -> None:
    pair = await active(world)
    buf = await pair.server.allocate_buffer(512)
    part = buf[10:20]
    await settle(pair.sdevs[0].close_device())
    await settle(pair.server.close())
    with pytest.raises(ValueError):
        bytes(buf)
    assert bytes(part) == bytes(10)  # a slice the caller made stays its own (decision 7)
