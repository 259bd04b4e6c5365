"""A restore detects every stream that is not what the backup wrote, names the device,
aborts the set and discards what it had written."""

from __future__ import annotations

import random
import uuid
from pathlib import Path

import anyio
import pytest

from tests.engines.fake_client import BLOCK, CHUNK, OPTIONS, FakeClient, backup, run_job
from vdistream import Registry
from vdistream.engines import (
    BytesConsumer,
    StreamFormatError,
    StripedBackup,
    StripedRestore,
    StripingOptions,
    device_names,
)

pytestmark = pytest.mark.asyncio

DEVICES = 4
SIZE = 11 * CHUNK + 999


async def streams_of(
    size: int = SIZE, devices: int = DEVICES, backup_id: uuid.UUID | None = None
) -> list[bytes]:
    registry = Registry()
    fake = FakeClient(registry, devices)
    engine = StripedBackup(random.Random(size).randbytes(size), OPTIONS, backup_id=backup_id)
    await run_job(engine, fake, registry)
    return fake.streams


async def restore_fails(
    streams: list[bytes],
    match: str,
    devices: set[int] | None = None,
    options: StripingOptions = OPTIONS,
) -> StreamFormatError:
    registry = Registry()
    fake = FakeClient(registry, len(streams), streams=streams)
    target = BytesConsumer()
    with pytest.raises(StreamFormatError, match=match) as info:
        await run_job(StripedRestore(target, options), fake, registry)
    assert fake.aborted, "the client must see the abort"
    assert not any(fake.closed)
    assert target.discarded
    assert not target.finished
    if devices is not None:
        names = device_names(fake.name, len(streams))
        assert info.value.device in {names[i] for i in devices}
        assert repr(info.value.device) in str(info.value)
    return info.value


async def test_swapped_streams() -> None:
    streams = await streams_of()
    streams[0], streams[1] = streams[1], streams[0]
    await restore_fails(streams, "swapped", {0, 1})


async def test_duplicated_stream() -> None:
    streams = await streams_of()
    streams[2] = streams[1]
    await restore_fails(streams, "carries stream 1 .* expected stream 2", {2})


async def test_missing_trailer() -> None:
    streams = await streams_of()
    streams[2] = streams[2][:-BLOCK]
    await restore_fails(streams, "trailer", {2})


async def test_truncated_mid_block() -> None:
    streams = await streams_of()
    streams[3] = streams[3][:-100]
    await restore_fails(streams, "not a multiple of the block size", {3})


async def test_chunk_cut_out_of_the_middle() -> None:
    streams = await streams_of()
    streams[1] = streams[1][: BLOCK + CHUNK] + streams[1][BLOCK + 2 * CHUNK :]
    await restore_fails(streams, "payload bytes", {1})


async def test_empty_stream() -> None:
    streams = await streams_of()
    streams[3] = b""
    await restore_fails(streams, "before its header", {3})


async def test_header_only() -> None:
    streams = await streams_of()
    streams[0] = streams[0][:BLOCK]
    await restore_fails(streams, "no trailer", {0})


async def test_stream_of_another_backup() -> None:
    streams = await streams_of()
    other = await streams_of()
    streams[2] = other[2]
    await restore_fails(streams, "belongs to backup", {2})


async def test_trailers_disagree_on_the_length() -> None:
    backup_id = uuid.uuid4()
    streams = await streams_of(backup_id=backup_id)
    longer = await streams_of(SIZE + 1, backup_id=backup_id)
    streams[0] = longer[0]  # device 0 holds no partial chunk either way: only L differs
    await restore_fails(streams, "another device's", {1})


async def test_corrupt_payload_byte() -> None:
    streams = await streams_of()
    damaged = bytearray(streams[1])
    damaged[BLOCK + 12345] ^= 0x40
    streams[1] = bytes(damaged)
    await restore_fails(streams, "CRC-32", {1})


async def test_corrupt_header_byte() -> None:
    streams = await streams_of()
    damaged = bytearray(streams[2])
    damaged[20] ^= 0x01
    streams[2] = bytes(damaged)
    await restore_fails(streams, "header block is corrupt", {2})


@pytest.mark.parametrize(
    "offset",
    [60, 32, 56],
    ids=["its own CRC", "total length under a stale CRC", "payload CRC under a stale CRC"],
)
async def test_damaged_trailer_block(offset: int) -> None:
    """The trailer block's own CRC-32 (bytes 60..63, framing) is checked: without the
    check the first case restores and the others fail later, with other messages."""
    streams = await streams_of()
    damaged = bytearray(streams[2])
    damaged[len(damaged) - BLOCK + offset] ^= 0x01
    streams[2] = bytes(damaged)
    await restore_fails(streams, "trailer block is corrupt", {2})  # names device 2


async def test_not_a_backup_at_all() -> None:
    streams = [random.Random(1).randbytes(3 * BLOCK) for _ in range(2)]
    await restore_fails(streams, "does not start with a header", {0, 1})


async def test_restore_with_another_block_size() -> None:
    streams = await streams_of()
    options = StripingOptions(block_size=2 * BLOCK, max_transfer_size=CHUNK)
    await restore_fails(streams, "BLOCKSIZE=4096", {0, 1, 2, 3}, options)


async def test_restore_with_fewer_devices() -> None:
    streams = await streams_of()
    await restore_fails(streams[:3], "4 device stream", {0, 1, 2})


async def test_trailing_garbage_after_the_trailer() -> None:
    streams = await streams_of()
    streams[1] = streams[1] + bytes(BLOCK)
    await restore_fails(streams, "trailer", {1})


async def test_a_file_target_keeps_nothing_of_a_failed_restore(tmp_path: Path) -> None:
    client, _ = await backup(Registry(), random.Random(3).randbytes(SIZE), 2)
    streams = client.streams
    streams[1] = streams[1][:-BLOCK]
    target = tmp_path / "restored.db"
    registry = Registry()
    fake = FakeClient(registry, 2, streams=streams)
    with pytest.raises(StreamFormatError):
        await run_job(StripedRestore(target, OPTIONS), fake, registry)
    assert not await anyio.Path(target).exists()
    assert [p async for p in anyio.Path(tmp_path).iterdir()] == []
