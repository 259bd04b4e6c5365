"""Secondary client objects serving some of a set's devices (spec §1.4, decision 9)."""

from __future__ import annotations

import pytest

from tests.vdi.conftest import configured
from vdistream import (
    ClientState,
    ClientVirtualDeviceSet,
    CommandCode,
    Registry,
    ServerState,
    VDAbortError,
    VDClosedError,
    VDConfig,
    VDOpenError,
    VDProtocolError,
)

pytestmark = pytest.mark.asyncio


async def test_primary_and_secondary_share_the_devices(registry: Registry) -> None:
    pair = await configured(registry, devices=2)
    secondary = ClientVirtualDeviceSet(registry=registry)
    secondary.open_in_secondary(pair.name)
    assert (await secondary.get_configuration(0)) == pair.config
    mine = pair.client.open_device(pair.name)
    theirs = secondary.open_device(pair.name + "1")
    sdevs = [pair.server.open_device(pair.name), pair.server.open_device(pair.name + "1")]
    assert pair.server.state is ServerState.ACTIVE
    for sdev in sdevs:
        sdev.send_command(CommandCode.FLUSH)
        sdev.close_device()
    for cdev in (mine, theirs):
        cdev.complete_command(await cdev.get_command(0), 0)
        with pytest.raises(VDClosedError):
            await cdev.get_command(0)
    assert secondary.state is ClientState.NORMALLY_TERMINATED
    assert secondary.close() is None
    assert pair.client.close() is None
    assert pair.server.close() is None


async def test_secondary_refusals(registry: Registry) -> None:
    secondary = ClientVirtualDeviceSet(registry=registry)
    with pytest.raises(VDProtocolError, match="no virtual device set"):
        secondary.open_in_secondary("nope")
    primary = ClientVirtualDeviceSet(registry=registry)
    primary.create("db", VDConfig())
    with pytest.raises(VDProtocolError, match="not ready"):
        secondary.open_in_secondary("db")  # before configuration
    pair = await configured(registry)
    secondary.open_in_secondary(pair.name)
    with pytest.raises(VDProtocolError, match="already open"):
        secondary.open_in_secondary(pair.name)
    pair.client.signal_abort()
    with pytest.raises(VDAbortError):
        ClientVirtualDeviceSet(registry=registry).open_in_secondary(pair.name)


async def test_secondary_close_with_its_device_open_aborts(registry: Registry) -> None:
    pair = await configured(registry, devices=2)
    secondary = ClientVirtualDeviceSet(registry=registry)
    secondary.open_in_secondary(pair.name)
    secondary.open_device(pair.name)
    with pytest.raises(VDOpenError):
        secondary.close()
    assert pair.client.state is ClientState.ABORTED
    assert pair.client.close() is None


async def test_secondary_close_without_devices_leaves_the_set(registry: Registry) -> None:
    pair = await configured(registry)
    secondary = ClientVirtualDeviceSet(registry=registry)
    secondary.open_in_secondary(pair.name)
    assert secondary.close() is None
    assert pair.client.state is ClientState.INITIALIZING
