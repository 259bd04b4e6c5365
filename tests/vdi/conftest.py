"""Builders for device sets in a known state, on a registry private to each test.

Every test that takes the ``world`` fixture runs twice: ``inproc`` (the engine side is
the in-process ``ServerVirtualDeviceSet``) and ``xproc`` (the engine side runs in a
child process, ``tests/transport/agent.py``, and opens the test's set through the
transport; see ``tests/transport/remote_proxy.py``). The same body holds in both:
engine-side calls go through ``await settle(...)`` (the remote side is awaitable where
it must wait for the other process), and ``await world.sync()`` marks the points where
what one side did must have reached the other (in-process it does nothing, not even
yield). A case that cannot make sense across processes is marked
``@pytest.mark.inproc_only(reason)``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio

from tests.transport.remote_proxy import AgentProcess, World, settle
from vdistream import (
    ClientVirtualDevice,
    ClientVirtualDeviceSet,
    Features,
    Registry,
    VDConfig,
)

__all__ = ("Pair", "World", "active", "address", "configured", "device_names", "settle")

_names = itertools.count()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "inproc_only(reason): a behaviour case that makes no sense across processes"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "world" in metafunc.fixturenames:
        sides = ["inproc"]
        if metafunc.definition.get_closest_marker("inproc_only") is None:
            sides.append("xproc")
        metafunc.parametrize("world", sides, indirect=True)


@pytest.fixture
def registry() -> Registry:
    return Registry()


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentProcess]:
    """One engine-side agent process per test module (a python start costs ~0.2 s)."""
    process = AgentProcess()
    yield process
    process.stop()


@pytest_asyncio.fixture
async def world(request: pytest.FixtureRequest) -> AsyncIterator[World]:
    if request.param == "inproc":
        yield World.inproc()
        return
    created = await World.xproc_on(request.getfixturevalue("agent"))
    try:
        yield created
    finally:
        await created.close()


def address(view: memoryview) -> int:
    """The address of a view's first byte (read-only views through a writable twin)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


@dataclasses.dataclass
class Pair:
    client: ClientVirtualDeviceSet
    server: Any  # ServerVirtualDeviceSet, or a RemoteSetProxy across processes
    config: VDConfig
    name: str
    cdevs: list[ClientVirtualDevice] = dataclasses.field(default_factory=list)
    sdevs: list[Any] = dataclasses.field(default_factory=list)


def device_names(name: str, count: int) -> list[str]:
    return [name] + [f"{name}{i}" for i in range(1, count)]


async def configured(
    world: World,
    *,
    devices: int = 1,
    features: int = 0,
    prefix_zone_size: int = 0,
    alignment: int = 0,
    server_timeout_ms: int = 0,
    media: int = Features.WRITE_MEDIA,
    block_size: int = 512,
    server_alignment: int = 0,
    max_transfer_size: int = 65536,
    buffers: int = 4,
    buffer_size: int | None = None,
) -> Pair:
    """A set whose server ended configuration and whose client read it back."""
    name = f"set-{next(_names)}"
    config = VDConfig(
        device_count=devices,
        features=features,
        prefix_zone_size=prefix_zone_size,
        alignment=alignment,
        server_timeout_ms=server_timeout_ms,
    )
    client = ClientVirtualDeviceSet(registry=world.registry)
    client.create(name, config)
    server = world.server_set()
    await settle(server.open(None, name))
    await settle(server.begin_configuration(media, block_size, server_alignment, max_transfer_size))
    if buffers:
        await settle(server.request_buffers(buffer_size or max_transfer_size, 0, buffers))
    await settle(server.end_configuration())
    final = await client.get_configuration(1)
    return Pair(client, server, final, name)


async def active(world: World, **kwargs: int) -> Pair:
    """A configured set with every device open on both sides."""
    pair = await configured(world, **kwargs)
    for dev in device_names(pair.name, pair.config.device_count):
        pair.cdevs.append(pair.client.open_device(dev))
        pair.sdevs.append(await settle(pair.server.open_device(dev)))
    await pair.server.wait_active(1)
    return pair
