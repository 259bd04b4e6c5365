"""Create, configure, activate, terminate: the normal path and the refusals on it."""

from __future__ import annotations

import anyio
import pytest

from tests.vdi.conftest import World, active, configured, device_names, settle
from vdistream import (
    ClientState,
    ClientVirtualDeviceSet,
    CommandCode,
    Features,
    Registry,
    ServerState,
    ServerVirtualDeviceSet,
    VDConfig,
    VDInstanceNameError,
    VDInvalidError,
    VDNotSupportedError,
    VDProtocolError,
    VDTimeoutError,
)
from vdistream.errors import VDClosedError

pytestmark = pytest.mark.asyncio


async def test_states_along_the_normal_path(world: World) -> None:
    client = ClientVirtualDeviceSet(registry=world.registry)
    server = world.server_set()
    assert (client.state, server.state) == (ClientState.DNE, ServerState.DNE)
    client.create("db", VDConfig(device_count=2))
    assert client.state is ClientState.CONFIGURABLE
    await settle(server.open(None, "db"))
    assert server.state is ServerState.CONNECTED
    await settle(server.begin_configuration(Features.WRITE_MEDIA, 512, 0, 65536))
    assert server.state is ServerState.CONFIGURABLE
    await settle(server.request_buffers(65536, 0, 2))
    await settle(server.end_configuration())
    assert (client.state, server.state) == (ClientState.INITIALIZING, ServerState.INITIALIZING)
    await client.get_configuration(0)
    cdevs = [client.open_device(n) for n in device_names("db", 2)]
    assert client.state is ClientState.INITIALIZING
    sdevs = [await settle(server.open_device(n)) for n in device_names("db", 2)]
    assert (client.state, server.state) == (ClientState.ACTIVE, ServerState.ACTIVE)
    for sdev in sdevs:
        await settle(sdev.close_device())
    assert server.state is ServerState.NORMALLY_TERMINATED
    assert client.state is ClientState.ACTIVE  # until the client saw every close
    for cdev in cdevs:
        with pytest.raises(VDClosedError):
            await cdev.get_command(0)
    assert client.state is ClientState.NORMALLY_TERMINATED
    assert client.close() is None
    assert await settle(server.close()) is None
    assert (client.state, server.state) == (ClientState.DNE, ServerState.DNE)


async def test_get_configuration_waits_for_end_configuration(world: World) -> None:
    client = ClientVirtualDeviceSet(registry=world.registry)
    client.create("db", VDConfig(features=Features.REQUEST_COMPLETE, device_count=3))
    server = world.server_set()
    await settle(server.open(None, "db"))
    got: list[VDConfig] = []

    async def wait() -> None:
        got.append(await client.get_configuration(5))

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        await anyio.sleep(0.02)
        assert got == []
        await settle(server.begin_configuration(Features.WRITE_MEDIA, 4096, 0, 1024 * 1024))
        await anyio.sleep(0.02)
        assert got == []
        await settle(server.end_configuration())
    (cfg,) = got
    assert cfg.block_size == 4096
    assert cfg.max_transfer_size == 1024 * 1024
    assert cfg.max_io_depth == 4
    assert cfg.buffer_area_size == 1024 * 1024 * 4 * 3
    assert cfg.features == Features.REQUEST_COMPLETE | Features.WRITE_MEDIA | (
        Features.COMPLETE_ENABLED
    )
    assert cfg.device_count == 3
    assert server.get_configuration().features == Features.REQUEST_COMPLETE


@pytest.mark.parametrize(
    ("asked", "honour", "media", "expected"),
    [
        (0, True, Features.WRITE_MEDIA, Features.WRITE_MEDIA),
        (0, True, Features.READ_MEDIA, Features.READ_MEDIA),
        (
            Features.LIKE_DISK,
            True,
            Features.WRITE_MEDIA | Features.READ_MEDIA,
            Features.LIKE_DISK | Features.WRITE_MEDIA | Features.READ_MEDIA,
        ),
        (
            Features.REQUEST_COMPLETE,
            False,
            Features.WRITE_MEDIA,
            Features.REQUEST_COMPLETE | Features.WRITE_MEDIA,
        ),
    ],
)
async def test_final_features(
    world: World, asked: int, honour: bool, media: int, expected: int
) -> None:
    client = ClientVirtualDeviceSet(registry=world.registry)
    client.create("db", VDConfig(features=asked))
    server = world.server_set()
    await settle(server.open(None, "db"))
    await settle(server.begin_configuration(media, 512, 0, 65536, honour_complete=honour))
    await settle(server.end_configuration())
    assert (await client.get_configuration(0)).features == expected


async def test_get_configuration_timeout_leaves_the_set_alone(world: World) -> None:
    client = ClientVirtualDeviceSet(registry=world.registry)
    client.create("db", VDConfig())
    with pytest.raises(VDTimeoutError) as info:
        await client.get_configuration(0.05)
    assert info.value.hresult == 0x80770003
    assert "'db'" in str(info.value)
    with pytest.raises(VDTimeoutError):
        await client.get_configuration(0)  # a poll
    assert client.state is ClientState.CONFIGURABLE
    server = world.server_set()
    await settle(server.open(None, "db"))
    await settle(server.begin_configuration(Features.WRITE_MEDIA, 512, 0, 65536))
    await settle(server.end_configuration())
    assert (await client.get_configuration(0)).block_size == 512


@pytest.mark.inproc_only("the client side alone: no engine side to move")
async def test_name_in_use_is_refused_and_freed_by_close(registry: Registry) -> None:
    first = ClientVirtualDeviceSet(registry=registry)
    first.create("db", VDConfig())
    second = ClientVirtualDeviceSet(registry=registry)
    with pytest.raises(VDInvalidError, match="already exists"):
        second.create("db", VDConfig())
    assert second.state is ClientState.DNE
    first.close()
    second.create("db", VDConfig())
    assert second.state is ClientState.CONFIGURABLE
    # the object that closed can create again (spec: the interface is reusable)
    first.create("other", VDConfig())
    assert first.name == "other"


@pytest.mark.inproc_only("a private registry is the in-process rendezvous")
async def test_registries_are_separate() -> None:
    mine, theirs = Registry(), Registry()
    client = ClientVirtualDeviceSet(registry=mine)
    client.create("db", VDConfig())
    with pytest.raises(VDInvalidError, match="no virtual device set"):
        ServerVirtualDeviceSet(registry=theirs).open(None, "db")
    ServerVirtualDeviceSet(registry=mine).open(None, "db")


@pytest.mark.inproc_only("the process-wide registry")
async def test_default_registry_is_process_wide() -> None:
    client = ClientVirtualDeviceSet()
    client.create("default-registry-test", VDConfig())
    server = ServerVirtualDeviceSet()
    try:
        server.open(None, "default-registry-test")
        assert server.state is ServerState.CONNECTED
    finally:
        server.signal_abort()
        server.close()
        client.close()


@pytest.mark.inproc_only("the client side alone: no engine side to move")
@pytest.mark.parametrize(
    "config",
    [
        VDConfig(device_count=0),
        VDConfig(device_count=65),
        VDConfig(features=Features.RANDOM_ACCESS | Features.FILE_MARKS),
        VDConfig(alignment=3),
        VDConfig(features=Features.WRITE_MEDIA),
    ],
)
async def test_create_refuses_bad_configurations(registry: Registry, config: VDConfig) -> None:
    client = ClientVirtualDeviceSet(registry=registry)
    with pytest.raises(VDNotSupportedError) as info:
        client.create("db", config)
    assert "'db'" in str(info.value)
    assert client.state is ClientState.DNE
    assert registry.lookup(None, "db") is None


async def test_create_refusals(world: World) -> None:
    client = ClientVirtualDeviceSet(registry=world.registry)
    with pytest.raises(VDInstanceNameError):
        client.create_ex("MACHINE\\SQL1", "db", VDConfig())
    with pytest.raises(VDInvalidError):
        client.create("bad\\name", VDConfig())
    with pytest.raises(VDInvalidError):
        client.create("", VDConfig())
    client.create_ex("SQL1", "db", VDConfig())
    with pytest.raises(VDProtocolError):
        client.create("db2", VDConfig())
    # the instance is part of the rendezvous; instance names ignore case
    with pytest.raises(VDInvalidError):
        await settle(world.server_set().open(None, "db"))
    await settle(world.server_set().open("sql1", "db"))


async def test_server_open_refusals(world: World) -> None:
    pair = await configured(world)
    # across processes the second engine is refused by the set's publisher instead
    with pytest.raises(VDInvalidError, match="already served" if world.xproc else "not accessible"):
        await settle(world.server_set().open(None, pair.name))
    with pytest.raises(VDProtocolError):
        await settle(pair.server.open(None, pair.name))


async def test_begin_configuration_validates(world: World) -> None:
    client = ClientVirtualDeviceSet(registry=world.registry)
    client.create("db", VDConfig())
    server = world.server_set()
    await settle(server.open(None, "db"))
    for args in [
        (0, 512, 0, 65536),
        (Features.WRITE_MEDIA, 500, 0, 65536),
        (Features.WRITE_MEDIA, 4096, 512, 65536),
        (Features.WRITE_MEDIA, 512, 0, 100000),
        (Features.WRITE_MEDIA | Features.RANDOM_ACCESS, 512, 0, 65536),
    ]:
        with pytest.raises(VDInvalidError):
            await settle(server.begin_configuration(*args))
        assert server.state is ServerState.CONNECTED
    with pytest.raises(VDProtocolError):
        await settle(server.end_configuration())  # not configurable yet
    await settle(server.begin_configuration(Features.WRITE_MEDIA, 512, 0, 65536))
    with pytest.raises(VDProtocolError):
        await settle(server.begin_configuration(Features.WRITE_MEDIA, 512, 0, 65536))


async def test_commands_before_active_complete_with_invalid_handle(world: World) -> None:
    pair = await configured(world, devices=2)
    sdev = await settle(pair.server.open_device(pair.name))
    cdev = pair.client.open_device(pair.name)
    result = await sdev.send_command(CommandCode.FLUSH)
    assert result.completion == 6  # ERROR_INVALID_HANDLE
    got: list[CommandCode] = []

    async def client_waits() -> None:
        # decision 2: get_command before the set is active waits, it does not fail
        got.append((await cdev.get_command(5)).code)

    async with anyio.create_task_group() as tg:
        tg.start_soon(client_waits)
        await anyio.sleep(0.02)
        assert got == []
        pair.client.open_device(pair.name + "1")
        await settle(pair.server.open_device(pair.name + "1"))
        assert pair.server.state is ServerState.ACTIVE
        pending = sdev.send_command(CommandCode.FLUSH)
        await anyio.sleep(0.02)
        await world.sync()
        assert got == [CommandCode.FLUSH]
    assert not pending.done()


async def test_wait_active(world: World) -> None:
    pair = await configured(world)
    with pytest.raises(VDTimeoutError):
        await pair.server.wait_active(0.01)
    await settle(pair.server.open_device(pair.name))
    pair.client.open_device(pair.name)
    await world.sync()
    await pair.server.wait_active(0)
    pair2 = await active(world)
    await pair2.server.wait_active(0)
