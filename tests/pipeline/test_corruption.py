"""Damaged streams: each kind of damage raises its own error class naming the URL, and
no plaintext of a damaged segment is ever returned."""

from __future__ import annotations

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.pipeline.conftest import (
    CONTEXT,
    SEGMENT,
    Chain,
    Failure,
    assert_nothing_of_segment,
    compressible_data,
    random_data,
    read_all,
    read_until_error,
    write_in_pieces,
)
from vdistream.errors import CorruptStreamError, KeyMissingError, PipelineError, WrongKeyError
from vdistream.pipeline import (
    CompressingSink,
    DecompressingSource,
    DecryptingSource,
    EncryptingSink,
    Key,
    stream_context,
)
from vdistream.pipeline.encrypt import HEADER_SIZE
from vdistream.storage import MemoryStorage, Storage

KEY = Key.generate()
DATA = random_data(10 * SEGMENT + 1234, seed=7)
RECORD = SEGMENT + 20  # a full segment as stored: length word, ciphertext, tag
URL = "memory://default/damaged"


async def _encrypt(data: bytes = DATA, context: bytes = CONTEXT, key: Key = KEY) -> bytes:
    storage = MemoryStorage()
    sink = EncryptingSink(await storage.open_sink("k"), key, context, segment_size=SEGMENT)
    await write_in_pieces(sink, data)
    await sink.commit()
    return await storage.read_bytes("k")


STORED = anyio.run(_encrypt)


def segment_of(offset: int) -> int:
    """The index of the segment the stored byte ``offset`` belongs to (-1: the header)."""
    return -1 if offset < HEADER_SIZE else (offset - HEADER_SIZE) // RECORD


def record(index: int) -> slice:
    start = HEADER_SIZE + index * RECORD
    return slice(start, start + RECORD)


async def _read_damaged(
    stored: bytes, *, key: Key | None = KEY, context: bytes = CONTEXT, size: int = 3000
) -> Failure:
    storage = MemoryStorage()
    await storage.write_bytes("damaged", stored)
    async with DecryptingSource(await storage.open_source("damaged"), key, context) as source:
        return await read_until_error(source, size)


def _expect_corrupt(failure: Failure, *, first_damaged: int, data: bytes = DATA) -> None:
    assert type(failure.error) is CorruptStreamError, failure.error
    assert URL in str(failure.error)
    assert_nothing_of_segment(failure, data, first_damaged)


@pytest.mark.asyncio
async def test_the_undamaged_stream_reads_back() -> None:
    storage = MemoryStorage()
    await storage.write_bytes("k", STORED)
    assert len(STORED) == HEADER_SIZE + 10 * RECORD + 1234 + 20
    source = DecryptingSource(await storage.open_source("k"), KEY, CONTEXT)
    assert await read_all(source) == DATA


@settings(max_examples=40, deadline=None)
@given(offset=st.integers(0, len(STORED) - 1), bit=st.integers(0, 7), size=st.integers(1, 9000))
def test_a_flipped_bit_anywhere_is_detected_before_its_segment_is_returned(
    offset: int, bit: int, size: int
) -> None:
    damaged = bytearray(STORED)
    damaged[offset] ^= 1 << bit
    failure = anyio.run(lambda: _read_damaged(bytes(damaged), size=size))
    segment = segment_of(offset)
    _expect_corrupt(failure, first_damaged=max(0, segment * SEGMENT))


@pytest.mark.asyncio
async def test_every_header_bit_flip_is_damage_not_a_wrong_key() -> None:
    for offset in range(HEADER_SIZE):
        for bit in range(8):
            damaged = bytearray(STORED)
            damaged[offset] ^= 1 << bit
            failure = await _read_damaged(bytes(damaged))
            _expect_corrupt(failure, first_damaged=0)


def _cuts() -> list[tuple[str, int]]:
    boundary = HEADER_SIZE + 3 * RECORD
    return [
        ("empty", 0),
        ("inside the magic", 5),
        ("inside the header", HEADER_SIZE - 1),
        ("right after the header", HEADER_SIZE),
        ("inside a length word", HEADER_SIZE + 2),
        ("inside the first segment", HEADER_SIZE + 100),
        ("inside a tag", boundary - 3),
        ("exactly at a segment boundary", boundary),
        ("one byte into a segment", boundary + 1),
        ("exactly before the final segment", HEADER_SIZE + 10 * RECORD),
        ("inside the final segment", len(STORED) - 21),
        ("one byte short", len(STORED) - 1),
    ]


@pytest.mark.asyncio
@pytest.mark.parametrize(("where", "cut"), _cuts(), ids=[name for name, _ in _cuts()])
async def test_truncation_is_detected(where: str, cut: int) -> None:
    failure = await _read_damaged(STORED[:cut], size=SEGMENT)
    # Segments wholly before the cut are intact and may be returned; the first
    # incomplete (or missing) one never is.
    intact = max(0, (cut - HEADER_SIZE) // RECORD) if cut >= HEADER_SIZE else 0
    _expect_corrupt(failure, first_damaged=min(intact, 10) * SEGMENT)
    assert "truncated" in str(failure.error) or "empty" in str(failure.error)
    if where == "exactly at a segment boundary":
        # reading in segment-sized calls, everything before the cut comes back
        assert failure.delivered == DATA[: 3 * SEGMENT]
        assert "after segment 2" in str(failure.error)


@pytest.mark.asyncio
async def test_reordered_segments_are_detected() -> None:
    damaged = bytearray(STORED)
    damaged[record(1)], damaged[record(2)] = STORED[record(2)], STORED[record(1)]
    failure = await _read_damaged(bytes(damaged), size=SEGMENT)
    _expect_corrupt(failure, first_damaged=SEGMENT)
    assert failure.delivered == DATA[:SEGMENT]
    assert "segment 1" in str(failure.error)


@pytest.mark.asyncio
async def test_a_dropped_segment_is_detected() -> None:
    damaged = bytearray(STORED)
    del damaged[record(4)]
    failure = await _read_damaged(bytes(damaged), size=SEGMENT)
    _expect_corrupt(failure, first_damaged=4 * SEGMENT)
    assert failure.delivered == DATA[: 4 * SEGMENT]


@pytest.mark.asyncio
async def test_a_replayed_segment_is_detected() -> None:
    damaged = bytearray(STORED)
    damaged[record(3)] = STORED[record(2)]
    failure = await _read_damaged(bytes(damaged), size=SEGMENT)
    _expect_corrupt(failure, first_damaged=3 * SEGMENT)


@pytest.mark.asyncio
async def test_data_appended_after_the_final_segment_is_detected() -> None:
    failure = await _read_damaged(STORED + b"\x00", size=SEGMENT)
    _expect_corrupt(failure, first_damaged=10 * SEGMENT)  # the final segment is withheld
    assert "after the final segment" in str(failure.error)


@pytest.mark.asyncio
async def test_a_final_segment_from_another_stream_is_detected() -> None:
    """Same key, same context, another stream: the header binds every segment."""
    other = await _encrypt()
    damaged = STORED[: HEADER_SIZE + 10 * RECORD] + other[HEADER_SIZE + 10 * RECORD :]
    failure = await _read_damaged(damaged, size=SEGMENT)
    _expect_corrupt(failure, first_damaged=10 * SEGMENT)


@pytest.mark.asyncio
async def test_device_streams_swapped_are_detected() -> None:
    """Two devices of one backup, same key: each stream only opens in its own place."""
    device0 = await _encrypt(DATA, stream_context("backup-1", 0, 2))
    device1 = await _encrypt(DATA[::-1], stream_context("backup-1", 1, 2))
    for stored, context in (
        (device0, stream_context("backup-1", 1, 2)),
        (device1, stream_context("backup-1", 0, 2)),
        (device0, stream_context("backup-2", 0, 2)),  # the same device of another backup
        (device0, stream_context("backup-1", 0, 3)),  # a different device count
    ):
        failure = await _read_damaged(stored, context=context)
        _expect_corrupt(failure, first_damaged=0, data=DATA if stored is device0 else DATA[::-1])
        assert failure.delivered == b""
        assert "another device or backup" in str(failure.error)


@pytest.mark.asyncio
async def test_a_wrong_key_is_its_own_error() -> None:
    failure = await _read_damaged(STORED, key=Key.generate())
    assert type(failure.error) is WrongKeyError
    assert "does not match the one this backup was encrypted with" in str(failure.error)
    assert URL in str(failure.error)
    assert failure.delivered == b""
    assert failure.last_buffer == bytes([0xA5]) * len(failure.last_buffer)


@pytest.mark.asyncio
async def test_a_wrong_key_is_reported_by_read_header_and_again_later() -> None:
    storage = MemoryStorage()
    await storage.write_bytes("k", STORED)
    source = DecryptingSource(await storage.open_source("k"), Key.generate(), CONTEXT)
    with pytest.raises(WrongKeyError):
        await source.read_header()
    with pytest.raises(WrongKeyError):  # the stream stays failed
        await source.readinto(memoryview(bytearray(10)))
    good = DecryptingSource(await storage.open_source("k"), KEY, CONTEXT)
    header = await good.read_header()
    assert header.segment_size == SEGMENT
    assert await read_all(good) == DATA


@pytest.mark.asyncio
async def test_a_missing_key_is_its_own_error() -> None:
    storage = MemoryStorage()
    await storage.write_bytes("damaged", STORED)
    with pytest.raises(KeyMissingError, match="no key was given") as raised:
        DecryptingSource(await storage.open_source("damaged"), None, CONTEXT)
    assert URL in str(raised.value)


@pytest.mark.asyncio
async def test_an_unencrypted_object_is_not_mistaken_for_a_stream() -> None:
    failure = await _read_damaged(DATA)
    _expect_corrupt(failure, first_damaged=0)
    assert "not in this format" in str(failure.error)


@pytest.mark.asyncio
async def test_an_unknown_format_version_is_refused() -> None:
    import hashlib

    damaged = bytearray(STORED[:HEADER_SIZE])
    damaged[8] = 2  # version
    damaged[68:76] = hashlib.sha256(damaged[:68]).digest()[:8]  # a consistent checksum
    failure = await _read_damaged(bytes(damaged) + STORED[HEADER_SIZE:])
    assert type(failure.error) is PipelineError
    assert "version 2" in str(failure.error)
    assert URL in str(failure.error)


# --- compression without encryption ---------------------------------------------------


def _compress(algorithm: str, data: bytes) -> bytes:
    async def run() -> bytes:
        storage = MemoryStorage()
        sink = CompressingSink(await storage.open_sink("k"), algorithm, None)
        await write_in_pieces(sink, data, flush_at=3)
        await sink.commit()
        return await storage.read_bytes("k")

    return anyio.run(run)


COMPRESSED = {
    algorithm: _compress(algorithm, compressible_data(200_000) + random_data(20_000))
    for algorithm in ("zstd", "lz4")
}


async def _decompress_damaged(algorithm: str, stored: bytes) -> Failure:
    storage = MemoryStorage()
    await storage.write_bytes("damaged", stored)
    async with DecompressingSource(await storage.open_source("damaged"), algorithm) as source:
        return await read_until_error(source, 10_000)


@pytest.mark.asyncio
@pytest.mark.parametrize("algorithm", ["zstd", "lz4"])
@pytest.mark.parametrize("cut", [0, 3, 10, 100, 0.5, -20, -4, -1])
async def test_a_truncated_compressed_stream_is_detected(algorithm: str, cut: float) -> None:
    stored = COMPRESSED[algorithm]
    end = int(cut * len(stored)) if isinstance(cut, float) else cut
    failure = await _decompress_damaged(algorithm, stored[:end])
    assert type(failure.error) is CorruptStreamError
    assert URL in str(failure.error)
    assert "truncated" in str(failure.error)


@pytest.mark.asyncio
@pytest.mark.parametrize("algorithm", ["zstd", "lz4"])
@pytest.mark.parametrize(
    "damage",
    ["trailing data", "a second frame", "garbage", "a changed checksum", "damaged data"],
)
async def test_a_damaged_compressed_stream_is_detected(algorithm: str, damage: str) -> None:
    stored = bytearray(COMPRESSED[algorithm])
    if damage == "trailing data":
        stored += b"\x00"
    elif damage == "a second frame":
        stored += COMPRESSED[algorithm]
    elif damage == "garbage":
        stored = bytearray(random_data(5000))
    elif damage == "a changed checksum":
        stored[-1] ^= 0x10
    else:
        stored[len(stored) // 2] ^= 0xFF
    failure = await _decompress_damaged(algorithm, bytes(stored))
    assert type(failure.error) is CorruptStreamError, failure.error
    assert URL in str(failure.error)


@pytest.mark.asyncio
async def test_compressed_and_encrypted_damage_is_caught_by_the_cipher() -> None:
    storage: Storage = MemoryStorage()
    chain = Chain.of("zstd:3", encrypted=True)
    data = compressible_data(300_000)
    sink = await chain.open_sink(storage, "k")
    await write_in_pieces(sink, data)
    await sink.commit()
    stored = bytearray(await storage.read_bytes("k"))
    stored[HEADER_SIZE + 30] ^= 0x01
    await storage.write_bytes("damaged", bytes(stored))
    source = await chain.open_source(storage, "damaged")
    failure = await read_until_error(source)
    assert type(failure.error) is CorruptStreamError
    assert "fails authentication" in str(failure.error)
    assert failure.delivered == b""
