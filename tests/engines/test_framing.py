"""The stream format without I/O: blocks, layout arithmetic, the incremental parser."""

from __future__ import annotations

import random
import uuid
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdistream.engines import StreamFormatError
from vdistream.engines.framing import (
    HEADER_MAGIC,
    TRAILER_MAGIC,
    DeviceStreamParser,
    StreamHeader,
    StreamTrailer,
    chunk_count,
    device_chunk_count,
    device_payload_length,
    round_up,
)

B = 512


def header(index: int = 0, count: int = 1, chunk: int = 4 * B) -> StreamHeader:
    return StreamHeader(uuid.UUID(int=42), index, count, B, chunk, 0)


def block_of(packable: StreamHeader | StreamTrailer) -> bytes:
    block = bytearray(b"\xff" * B)
    packable.pack_into(memoryview(block))
    return bytes(block)


def test_header_and_trailer_round_trip() -> None:
    h = header(2, 3)
    data = block_of(h)
    assert data.startswith(HEADER_MAGIC)
    assert data[48:] == bytes(B - 48)  # the rest of the block is zeroed
    assert StreamHeader.unpack(data) == h
    t = StreamTrailer(uuid.UUID(int=42), 2, 3, 10**12, 7 * B, 3, 0xDEADBEEF)
    data = block_of(t)
    assert data.startswith(TRAILER_MAGIC)
    assert StreamTrailer.unpack(data) == t


@pytest.mark.parametrize("offset", [9, 13, 30, 44])
def test_a_damaged_header_is_detected(offset: int) -> None:
    data = bytearray(block_of(header()))
    data[offset] ^= 0x10
    with pytest.raises(StreamFormatError, match=r"corrupt|version"):
        StreamHeader.unpack(bytes(data), device="d")


def test_magic_mismatches() -> None:
    with pytest.raises(StreamFormatError, match="header block"):
        StreamHeader.unpack(bytes(B))
    with pytest.raises(StreamFormatError, match="trailer block"):
        StreamTrailer.unpack(block_of(header()))


@pytest.mark.parametrize("devices", [1, 2, 3, 7])
@pytest.mark.parametrize("total", [0, 1, B, 4 * B - 1, 4 * B, 4 * B + 1, 29 * B + 5])
def test_layout_adds_up(devices: int, total: int) -> None:
    chunk = 4 * B
    chunks = chunk_count(total, chunk)
    assert sum(device_chunk_count(total, chunk, devices, d) for d in range(devices)) == chunks
    payload = sum(device_payload_length(total, chunk, B, devices, d) for d in range(devices))
    assert payload == round_up(total, B)
    assert payload % B == 0


def stream_for(data: bytes, chunk: int = 4 * B) -> bytes:
    """A one-device stream, built by hand from the format description."""
    padded = data + bytes(round_up(len(data), B) - len(data))
    chunks = chunk_count(len(data), chunk)
    trailer = StreamTrailer(
        uuid.UUID(int=42), 0, 1, len(data), len(padded), chunks, zlib.crc32(padded)
    )
    return block_of(header(chunk=chunk)) + padded + block_of(trailer)


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(0, 20 * B),
    cuts=st.lists(st.integers(1, 6), min_size=1, max_size=8),
)
def test_parser_yields_the_payload_whatever_the_piece_sizes(size: int, cuts: list[int]) -> None:
    data = random.Random(size).randbytes(size)
    stream = stream_for(data)
    parser = DeviceStreamParser(block_size=B, device_index=0, device_count=1)
    out = bytearray()
    offset, turn = 0, 0
    while offset < len(stream):
        piece = memoryview(stream)[offset : offset + cuts[turn % len(cuts)] * B]
        offset += piece.nbytes
        turn += 1
        for item in parser.feed(piece):
            out += item
    final, trailer = parser.finish()
    out += final
    assert trailer.total_length == size
    assert bytes(out[:size]) == data
    assert not any(out[size:])
    assert parser.header == header()


def test_parser_lends_slices_of_the_fed_buffer() -> None:
    stream = stream_for(random.Random(1).randbytes(10 * B))
    parser = DeviceStreamParser(block_size=B, device_index=0, device_count=1)
    view = memoryview(stream)
    items = parser.feed(view)
    assert any(isinstance(item, memoryview) and item.obj is stream for item in items)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda s: s[:B], "no trailer"),
        (lambda s: s[: B // 2], "before its header"),
        (lambda s: s[:-1], "not a multiple"),
        (lambda s: s[:-B], "trailer"),
        (lambda s: s[:B] + s[2 * B :], "payload bytes"),
        (lambda s: s[: 2 * B] + bytes([s[2 * B] ^ 1]) + s[2 * B + 1 :], "CRC-32"),
    ],
)
def test_parser_rejects_damaged_streams(mutate: object, match: str) -> None:
    stream = mutate(stream_for(random.Random(2).randbytes(6 * B)))  # type: ignore[operator]
    parser = DeviceStreamParser(block_size=B, device_index=0, device_count=1, device="dev")

    def parse() -> None:
        parser.feed(memoryview(stream))
        parser.finish()

    with pytest.raises(StreamFormatError, match=match) as info:
        parse()
    assert info.value.device == "dev"


def test_parser_checks_the_device_position() -> None:
    stream = stream_for(b"abc")
    with pytest.raises(StreamFormatError, match="expected stream 1"):
        DeviceStreamParser(block_size=B, device_index=1, device_count=1).feed(memoryview(stream))
    with pytest.raises(StreamFormatError, match="1 device stream"):
        DeviceStreamParser(block_size=B, device_index=0, device_count=2).feed(memoryview(stream))
    with pytest.raises(StreamFormatError, match="BLOCKSIZE=512"):
        DeviceStreamParser(block_size=2 * B, device_index=0, device_count=1).feed(
            memoryview(stream)
        )


def test_the_payload_crc_is_zlibs_computed_by_isal() -> None:
    """The CRC-32 of the framing is zlib's (streams stay readable whichever computes
    it), and the fast implementation, a declared dependency, is the one in use."""
    from vdistream.engines.framing import crc32

    data = memoryview(random.Random(7).randbytes(1 << 20))
    assert crc32(data, 12345) == zlib.crc32(data, 12345)
    assert crc32(data[:0], 7) == 7
    assert crc32.__module__ == "isal.isal_zlib"
