"""Backup then restore gives back the same bytes, whatever the devices, mode and size."""

from __future__ import annotations

import os
import random

import pytest

from tests.engines.fake_client import BLOCK, CHUNK, OPTIONS, backup, restore
from vdistream import CommandCode, Completion, Features, Registry
from vdistream.engines import (
    Direction,
    StripingOptions,
    framing,
)

pytestmark = pytest.mark.asyncio

MODES = {"pipe": Features.LIKE_PIPE, "disk": Features.LIKE_DISK}


def sizes_for(devices: int) -> dict[str, int]:
    return {
        "empty": 0,
        "one": 1,
        "block-1": BLOCK - 1,
        "chunk": CHUNK,
        # every device gets chunks, the last one short; 64 devices: some get none
        "many": min(devices * 2, 70) * CHUNK + 777,
    }


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("devices", [1, 4, 64])
@pytest.mark.parametrize("size_name", ["empty", "one", "block-1", "chunk", "many"])
async def test_round_trip(registry: Registry, devices: int, mode: str, size_name: str) -> None:
    size = sizes_for(devices)[size_name]
    data = payload(size, devices)
    features = MODES[mode]
    client, result = await backup(registry, data, devices, features=features)
    assert result.direction is Direction.BACKUP
    assert result.logical_bytes == size
    assert client.config is not None
    assert client.config.features & Features.WRITE_MEDIA
    assert bool(client.config.features & Features.READ_MEDIA) == (mode == "disk")
    streams = client.streams
    for index, stream in enumerate(streams):
        assert len(stream) % BLOCK == 0
        want = framing.device_payload_length(size, CHUNK, BLOCK, devices, index)
        assert len(stream) == want + 2 * BLOCK  # header + payload + trailer
        assert result.devices[index].bytes == len(stream)
    restored, rclient, rresult = await restore(Registry(), streams, features=features)
    assert restored == data
    assert rresult.direction is Direction.RESTORE
    assert rresult.logical_bytes == size
    assert rresult.backup_id == result.backup_id
    assert rclient.config is not None
    assert rclient.config.features & Features.READ_MEDIA
    assert not rclient.config.features & Features.WRITE_MEDIA
    assert all(rclient.closed)
    assert all(client.closed)
    assert not rclient.aborted
    assert not client.aborted


async def test_restore_reads_with_sizes_unlike_the_backup(registry: Registry) -> None:
    data = payload(9 * CHUNK + 4321)
    client, _ = await backup(registry, data, 3)
    writes = {s for d in range(3) for s in client.sizes(d, CommandCode.WRITE)}
    assert writes == {BLOCK, 2 * BLOCK, CHUNK}  # header/trailer, the padded last chunk, chunks
    options = StripingOptions(
        block_size=BLOCK, max_transfer_size=4 * CHUNK, read_sizes=(BLOCK, 3 * BLOCK, 4 * CHUNK)
    )
    restored, rclient, _ = await restore(Registry(), client.streams, options=options)
    assert restored == data
    reads = [s for d in range(3) for s in rclient.sizes(d, CommandCode.READ)]
    assert {BLOCK, 3 * BLOCK, 4 * CHUNK} <= set(reads)
    # default schedule: every READ is MAXTRANSFERSIZE, the fewest commands
    restored, rclient, _ = await restore(Registry(), client.streams)
    assert restored == data
    reads = [s for d in range(3) for s in rclient.sizes(d, CommandCode.READ)]
    assert set(reads) == {OPTIONS.max_transfer_size}


async def test_restore_with_out_of_order_completions_and_no_data_detected(
    registry: Registry,
) -> None:
    data = payload(5 * CHUNK + 17)
    client, _ = await backup(registry, data, 2, batch=4)
    assert max(client.max_held) >= 2  # several WRITEs outstanding on a device
    restored, rclient, _ = await restore(
        Registry(), client.streams, batch=4, eof_code=Completion.NO_DATA_DETECTED
    )
    assert restored == data
    assert max(rclient.max_held) >= 2


async def test_several_commands_outstanding_per_device(registry: Registry) -> None:
    data = payload(16 * CHUNK)
    client, _ = await backup(registry, data, 4, batch=8, delay=0.002)
    # BUFFERCOUNT defaults to 2 per device: two WRITEs in flight on each device
    assert min(client.max_held) >= 2
    restored, rclient, _ = await restore(Registry(), client.streams, batch=8, delay=0.002)
    assert restored == data
    assert min(rclient.max_held) >= 2


@pytest.mark.parametrize("buffers", [1, 3])
async def test_backup_with_fewer_buffers_than_devices(registry: Registry, buffers: int) -> None:
    options = StripingOptions(block_size=BLOCK, max_transfer_size=CHUNK, buffer_count=buffers)
    data = payload(7 * CHUNK + 1)
    client, _ = await backup(registry, data, 4, options=options)
    restored, _, _ = await restore(Registry(), client.streams)
    assert restored == data


async def test_default_options_round_trip(registry: Registry) -> None:
    data = os.urandom(3 << 20)
    client, result = await backup(registry, data, 2, options=StripingOptions())
    assert {s for d in range(2) for s in client.sizes(d, CommandCode.WRITE)} == {65536, 1 << 20}
    assert result.commands(CommandCode.WRITE) == [2 + 2, 2 + 1]  # header+trailer+chunks
    restored, _, _ = await restore(Registry(), client.streams, options=StripingOptions())
    assert restored == data


async def test_disk_like_writes_carry_their_stream_offset(registry: Registry) -> None:
    data = payload(5 * CHUNK + 3)
    client, _ = await backup(registry, data, 2, features=Features.LIKE_DISK)
    for device in range(2):
        writes = [c for c in client.seen[device] if c.code is CommandCode.WRITE]
        offset = 0
        for write in writes:
            assert write.position == offset
            offset += write.size
        assert client.seen[device][0].code is CommandCode.SET_POSITION
    _, rclient, _ = await restore(Registry(), client.streams, features=Features.LIKE_DISK)
    for device in range(2):
        reads = [c for c in rclient.seen[device] if c.code is CommandCode.READ]
        assert [r.position for r in reads][:2] == [0, reads[0].size]
        assert rclient.seen[device][0].code is CommandCode.SET_POSITION


async def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="block_size"):
        StripingOptions(block_size=1000)
    with pytest.raises(ValueError, match="max_transfer_size"):
        StripingOptions(max_transfer_size=1000)
    with pytest.raises(ValueError, match="buffer_count"):
        StripingOptions(buffer_count=0)
    with pytest.raises(ValueError, match="read size"):
        StripingOptions(block_size=4096, max_transfer_size=65536, read_sizes=(5000,))
    with pytest.raises(ValueError, match="read size"):
        StripingOptions(block_size=4096, max_transfer_size=65536, read_sizes=(131072,))
    assert OPTIONS.read_schedule() == (OPTIONS.max_transfer_size,)
