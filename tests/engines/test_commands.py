"""The command sequences of spec §6.2-6.4: FLUSH, COMPLETE, CLEAR_ERROR, statistics."""

from __future__ import annotations

import random

import pytest

from tests.engines.fake_client import BLOCK, CHUNK, backup, restore
from vdistream import CommandCode, Features, Registry
from vdistream.engines import StripingOptions

pytestmark = pytest.mark.asyncio

DATA = random.Random(5).randbytes(9 * CHUNK + 100)
WRITE, READ = CommandCode.WRITE, CommandCode.READ
FLUSH, COMPLETE, CLEAR = CommandCode.FLUSH, CommandCode.COMPLETE, CommandCode.CLEAR_ERROR


@pytest.mark.parametrize("features", [Features.LIKE_PIPE, Features.LIKE_DISK])
async def test_flush_ends_every_device_and_no_complete_unless_asked(
    registry: Registry, features: int
) -> None:
    client, result = await backup(registry, DATA, 4, features=features)
    assert client.config is not None
    assert not client.config.features & Features.COMPLETE_ENABLED
    for codes in client.codes:
        assert codes.count(FLUSH) == 1
        assert codes[-1] is FLUSH  # after every WRITE: the last command before the close
        assert COMPLETE not in codes
        assert set(codes) <= {WRITE, FLUSH, CommandCode.SET_POSITION}
    assert result.commands(FLUSH) == [1, 1, 1, 1]
    assert result.commands(COMPLETE) == [0, 0, 0, 0]


async def test_complete_is_sent_when_granted(registry: Registry) -> None:
    client, result = await backup(registry, DATA, 3, features=Features.REQUEST_COMPLETE)
    assert client.config is not None
    assert client.config.features & Features.COMPLETE_ENABLED
    for codes in client.codes:
        assert codes[-2:] == [FLUSH, COMPLETE]
        assert codes.count(COMPLETE) == 1
    assert result.features & Features.COMPLETE_ENABLED
    assert result.commands(COMPLETE) == [1, 1, 1]


async def test_complete_is_not_sent_when_not_honoured(registry: Registry) -> None:
    options = StripingOptions(block_size=BLOCK, max_transfer_size=CHUNK, honour_complete=False)
    client, result = await backup(
        registry, DATA, 3, features=Features.REQUEST_COMPLETE, options=options
    )
    assert client.config is not None
    assert not client.config.features & Features.COMPLETE_ENABLED
    assert all(COMPLETE not in codes and codes[-1] is FLUSH for codes in client.codes)
    assert result.commands(COMPLETE) == [0, 0, 0]


async def test_restore_sequence(registry: Registry) -> None:
    client, _ = await backup(registry, DATA, 3)
    restored, rclient, result = await restore(
        Registry(), client.streams, features=Features.REQUEST_COMPLETE
    )
    assert restored == DATA
    assert rclient.config is not None
    assert not rclient.config.features & Features.COMPLETE_ENABLED  # restore sends no COMPLETE
    for index, codes in enumerate(rclient.codes):
        assert codes[-1] is CLEAR  # the end of data put the device in the error state
        assert set(codes[:-1]) == {READ}
        results = [c for c in rclient.seen[index] if c.code is READ]
        assert sum(c.size for c in results) >= len(client.streams[index])
    assert result.commands(CLEAR) == [1, 1, 1]
    assert result.commands(FLUSH) == [0, 0, 0]


async def test_statistics_match_what_the_client_saw(registry: Registry) -> None:
    client, result = await backup(registry, DATA, 4, features=Features.REQUEST_COMPLETE)
    assert result.logical_bytes == len(DATA)
    assert result.stream_bytes == sum(len(s) for s in client.streams)
    for index, device in enumerate(result.devices):
        assert device.index == index
        assert device.name == (client.name if index == 0 else f"{client.name}{index}")
        assert device.total_commands == len(client.codes[index])
        assert device.count(WRITE) == client.codes[index].count(WRITE)
    _, rclient, rresult = await restore(Registry(), client.streams)
    assert rresult.stream_bytes == result.stream_bytes
    for index, device in enumerate(rresult.devices):
        # the engine counts READs the device refused once it hit the end, too
        assert device.count(READ) >= rclient.codes[index].count(READ)


async def test_writes_are_block_multiples_within_the_transfer_size(registry: Registry) -> None:
    client, _ = await backup(registry, DATA, 2)
    sizes = [c.size for seen in client.seen for c in seen if c.code is WRITE]
    assert all(s % BLOCK == 0 and BLOCK <= s <= CHUNK for s in sizes)
    assert client.seen[0][0].size == BLOCK  # the header block comes first
