"""The per-device I/O-error protocol of spec §3.7."""

from __future__ import annotations

import anyio
import pytest

from tests.vdi.conftest import World, active, settle
from vdistream import CommandCode, Completion

pytestmark = pytest.mark.asyncio


async def test_error_completion_and_clear_error(world: World) -> None:
    pair = await active(world, devices=2)
    sdev, cdev = pair.sdevs[0], pair.cdevs[0]
    first, second = sdev.send_command(CommandCode.FLUSH), sdev.send_command(CommandCode.FLUSH)
    queued = [sdev.send_command(CommandCode.FLUSH) for _ in range(2)]
    await world.sync()
    a = await cdev.get_command(0)
    b = await cdev.get_command(0)
    # 1. an error completion puts the device in the I/O-error state
    cdev.complete_command(a, Completion.DISK_FULL)
    assert (await first).completion == Completion.DISK_FULL
    # 3. queued, undelivered commands complete with IO_DEVICE and are never seen
    assert [(await q).completion for q in queued] == [Completion.IO_DEVICE] * 2
    # 2. new commands are refused at once, except CLEAR_ERROR
    refused = sdev.send_command(CommandCode.FLUSH)
    await world.sync()
    assert refused.done()
    assert refused.result().completion == Completion.IO_DEVICE
    clear = sdev.send_command(CommandCode.CLEAR_ERROR)
    await world.sync()
    assert not clear.done()
    # other devices are unaffected
    other = pair.sdevs[1].send_command(CommandCode.FLUSH)
    await world.sync()
    assert (await pair.cdevs[1].get_command(0)).code is CommandCode.FLUSH
    assert not other.done()
    # 3. CLEAR_ERROR is held back until the outstanding command completed
    got: list[CommandCode] = []

    async def take() -> None:
        got.append((await cdev.get_command(5)).code)

    async with anyio.create_task_group() as tg:
        tg.start_soon(take)
        await anyio.sleep(0.02)
        assert got == []
        cdev.complete_command(b, Completion.SUCCESS)
    assert got == [CommandCode.CLEAR_ERROR]
    assert (await second).completion == 0
    # 4. completing CLEAR_ERROR with success makes the device active again
    (clear_cmd,) = cdev.core.outstanding.values()
    assert clear_cmd.command is not None
    cdev.complete_command(clear_cmd.command, Completion.SUCCESS)
    assert (await clear).completion == 0
    again = sdev.send_command(CommandCode.FLUSH)
    await world.sync()
    assert (await cdev.get_command(0)).code is CommandCode.FLUSH
    await world.sync()
    assert not again.done()


async def test_failed_clear_error_keeps_the_device_errored(world: World) -> None:
    pair = await active(world)
    sdev, cdev = pair.sdevs[0], pair.cdevs[0]
    sdev.send_command(CommandCode.FLUSH)
    await world.sync()
    cdev.complete_command(await cdev.get_command(0), Completion.HANDLE_EOF)
    await world.sync()
    clear = sdev.send_command(CommandCode.CLEAR_ERROR)
    await world.sync()
    cdev.complete_command(await cdev.get_command(0), Completion.IO_DEVICE)
    assert (await clear).completion == Completion.IO_DEVICE
    await world.sync()
    assert (await sdev.send_command(CommandCode.FLUSH)).completion == Completion.IO_DEVICE


async def test_close_device_while_errored(world: World) -> None:
    from vdistream import VDClosedError

    pair = await active(world)
    sdev, cdev = pair.sdevs[0], pair.cdevs[0]
    sdev.send_command(CommandCode.FLUSH)
    await world.sync()
    cdev.complete_command(await cdev.get_command(0), Completion.DISK_FULL)
    await settle(sdev.close_device())  # 5. instead of ClearError the server may close the device
    with pytest.raises(VDClosedError):
        await cdev.get_command(0)
    assert pair.client.close() is None
    assert await settle(pair.server.close()) is None
