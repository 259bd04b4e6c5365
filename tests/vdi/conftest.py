"""Builders for device sets in a known state, on a registry private to each test."""

from __future__ import annotations

import ctypes
import dataclasses
import itertools

import pytest

from vdistream import (
    ClientVirtualDevice,
    ClientVirtualDeviceSet,
    Features,
    Registry,
    ServerVirtualDevice,
    ServerVirtualDeviceSet,
    VDConfig,
)

_names = itertools.count()


@pytest.fixture
def registry() -> Registry:
    return Registry()


def address(view: memoryview) -> int:
    """The address of a view's first byte (read-only views through a writable twin)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


@dataclasses.dataclass
class Pair:
    client: ClientVirtualDeviceSet
    server: ServerVirtualDeviceSet
    config: VDConfig
    name: str
    cdevs: list[ClientVirtualDevice] = dataclasses.field(default_factory=list)
    sdevs: list[ServerVirtualDevice] = dataclasses.field(default_factory=list)


def device_names(name: str, count: int) -> list[str]:
    return [name] + [f"{name}{i}" for i in range(1, count)]


async def configured(
    registry: Registry,
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
    client = ClientVirtualDeviceSet(registry=registry)
    client.create(name, config)
    server = ServerVirtualDeviceSet(registry=registry)
    server.open(None, name)
    server.begin_configuration(media, block_size, server_alignment, max_transfer_size)
    if buffers:
        server.request_buffers(buffer_size or max_transfer_size, 0, buffers)
    server.end_configuration()
    final = await client.get_configuration(1)
    return Pair(client, server, final, name)


async def active(registry: Registry, **kwargs: int) -> Pair:
    """A configured set with every device open on both sides."""
    pair = await configured(registry, **kwargs)
    for dev in device_names(pair.name, pair.config.device_count):
        pair.cdevs.append(pair.client.open_device(dev))
        pair.sdevs.append(pair.server.open_device(dev))
    await pair.server.wait_active(1)
    return pair
