"""Secondary client objects serving some of a set's devices (spec §1.4, decision 9)."""

from __future__ import annotations

import pytest

from tests.vdi.conftest import World, configured, settle
from vdistream import (
    ClientState,
    ClientVirtualDeviceSet,
    CommandCode,
    ServerState,
    VDAbortError,
    VDClosedError,
    VDConfig,
    VDOpenError,
    VDProtocolError,
)

pytestmark = pytest.mark.asyncio


async def test_primary_and_secondary_share_the_devices(world: World) -> None:
    pair = await configured(world, devices=2)
    secondary = ClientVirtualDeviceSet(registry=world.registry)
    secondary.open_in_secondary(pair.name)
    assert (await secondary.get_configuration(0)) == pair.config
    mine = pair.client.open_device(pair.name)
    theirs = secondary.open_device(pair.name + "1")
    sdevs = [
        await settle(pair.server.open_device(pair.name)),
        await settle(pair.server.open_device(pair.name + "1")),
    ]
    assert pair.server.state is ServerState.ACTIVE
    for sdev in sdevs:
        sdev.send_command(CommandCode.FLUSH)
        await settle(sdev.close_device())
    for cdev in (mine, theirs):
        cdev.complete_command(await cdev.get_command(0), 0)
        with pytest.raises(VDClosedError):
            await cdev.get_command(0)
    assert secondary.state is ClientState.NORMALLY_TERMINATED
    assert secondary.close() is None
    assert pair.client.close() is None
    assert await settle(pair.server.close()) is None


async def test_secondary_refusals(world: World) -> None:
    secondary = ClientVirtualDeviceSet(registry=world.registry)
    with pytest.raises(VDProtocolError, match="no virtual device set"):
        secondary.open_in_secondary("nope")
    primary = ClientVirtualDeviceSet(registry=world.registry)
    primary.create("db", VDConfig())
    with pytest.raises(VDProtocolError, match="not ready"):
        secondary.open_in_secondary("db")  # before configuration
    pair = await configured(world)
    secondary.open_in_secondary(pair.name)
    with pytest.raises(VDProtocolError, match="already open"):
        secondary.open_in_secondary(pair.name)
    pair.client.signal_abort()
    with pytest.raises(VDAbortError):
        ClientVirtualDeviceSet(registry=world.registry).open_in_secondary(pair.name)


async def test_secondary_close_with_its_device_open_aborts(world: World) -> None:
    pair = await configured(world, devices=2)
    secondary = ClientVirtualDeviceSet(registry=world.registry)
    secondary.open_in_secondary(pair.name)
    secondary.open_device(pair.name)
    with pytest.raises(VDOpenError):
        secondary.close()
    assert pair.client.state is ClientState.ABORTED
    assert pair.client.close() is None


async def test_secondary_close_without_devices_leaves_the_set(world: World) -> None:
    pair = await configured(world)
    secondary = ClientVirtualDeviceSet(registry=world.registry)
    secondary.open_in_secondary(pair.name)
    assert secondary.close() is None
    assert pair.client.state is ClientState.INITIALIZING
