"""Helpers for the pipeline stage tests: chains of stages, data, reading until an error."""

from __future__ import annotations

import dataclasses
import itertools
import os
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

import anyio
import pytest

from vdistream.pipeline import (
    CompressingSink,
    CompressionSpec,
    DecompressingSource,
    DecryptingSource,
    EncryptingSink,
    Key,
    parse_compression,
    stream_context,
)
from vdistream.storage import FileStorage, MemoryStorage, Sink, Source, Storage

COMPRESSIONS = ("none", "zstd:1", "zstd:3", "lz4")
#: Uneven write sizes, including empty and one-byte writes and one larger than a segment.
WRITE_SIZES = (1, 7, 0, 4096, 65_539, 100_000, 13, 333, 131_072)
#: Uneven read buffer sizes.
READ_SIZES = (1, 5, 4096, 65_536, 7, 100_003, 17)
#: A small segment size so that tests cross many segment boundaries.
SEGMENT = 4096
CONTEXT = stream_context("backup-1", 0, 2)


def files_under(root: Path) -> list[str]:
    """Every regular file below ``root`` (hidden temporaries included)."""
    if not root.exists():
        return []
    return sorted(
        Path(directory, name).relative_to(root).as_posix()
        for directory, _, names in os.walk(root)
        for name in names
    )


def random_data(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def compressible_data(size: int, seed: int = 2) -> bytes:
    """Text-like runs and zero pages, like a database file."""
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randint(3, 12)) for _ in range(200)]
    out = bytearray()
    while len(out) < size:
        if rng.random() < 0.1:
            out += bytes(8192)
        else:
            out += b" ".join(rng.choice(words) for _ in range(50))
    return bytes(out[:size])


@dataclasses.dataclass
class Chain:
    """Which stages a device stream goes through (compress, then encrypt)."""

    compression: CompressionSpec
    key: Key | None = None
    context: bytes = CONTEXT
    segment_size: int = SEGMENT
    limiter: anyio.CapacityLimiter | None = None

    @classmethod
    def of(cls, compression: str, encrypted: bool, **kwargs: object) -> Chain:
        key = Key.generate() if encrypted else None
        return cls(parse_compression(compression), key, **kwargs)  # type: ignore[arg-type]

    def wrap_sink(self, sink: Sink) -> Sink:
        if self.key is not None:
            sink = EncryptingSink(
                sink,
                self.key,
                self.context,
                segment_size=self.segment_size,
                limiter=self.limiter,
            )
        if self.compression.enabled:
            sink = CompressingSink(
                sink, self.compression.algorithm, self.compression.level, limiter=self.limiter
            )
        return sink

    def wrap_source(self, source: Source, *, key: Key | None = None) -> Source:
        if self.key is not None:
            source = DecryptingSource(source, key or self.key, self.context, limiter=self.limiter)
        if self.compression.enabled:
            source = DecompressingSource(source, self.compression.algorithm, limiter=self.limiter)
        return source

    async def open_sink(self, storage: Storage, name: str, device: str = "dev0") -> Sink:
        return self.wrap_sink(await storage.open_sink(name, device=device))

    async def open_source(self, storage: Storage, name: str) -> Source:
        return self.wrap_source(await storage.open_source(name))


async def write_in_pieces(
    sink: Sink, data: bytes, sizes: Sequence[int] = WRITE_SIZES, *, flush_at: int | None = None
) -> None:
    """Write ``data`` in pieces of the cycled ``sizes``; flush once after piece ``flush_at``."""
    offset = 0
    for number, size in enumerate(itertools.cycle(sizes)):
        if offset >= len(data):
            break
        await sink.write(memoryview(data)[offset : offset + size])
        offset += min(size, len(data) - offset)
        if number == flush_at:
            await sink.flush()


async def read_all(source: Source, sizes: Iterable[int] = READ_SIZES) -> bytes:
    """Everything ``source`` delivers, read with the cycled buffer ``sizes``."""
    out = bytearray()
    for size in itertools.cycle(sizes):
        buffer = memoryview(bytearray(size))
        count = await source.readinto(buffer)
        assert count <= size
        out += buffer[:count]
        if count < size:  # short only at the end: then it stays at the end
            assert await source.readinto(memoryview(bytearray(10))) == 0
            return bytes(out)
    raise AssertionError("unreachable")


SENTINEL = 0xA5


@dataclasses.dataclass
class Failure:
    """What a reader got before it raised: the bytes delivered and the error."""

    delivered: bytes
    error: BaseException
    #: the buffer of the call that raised, pre-filled with SENTINEL
    last_buffer: bytes
    #: the stream position when that call started
    last_position: int


async def read_until_error(source: Source, size: int = 3000) -> Failure:
    """Read until ``readinto`` raises; it must raise (the stream is damaged)."""
    out = bytearray()
    while True:
        buffer = bytearray([SENTINEL]) * size
        try:
            count = await source.readinto(memoryview(buffer))
        except Exception as exc:
            return Failure(bytes(out), exc, bytes(buffer), len(out))
        if not count:
            raise AssertionError(f"the damage was not detected; {len(out)} bytes read")
        out += buffer[:count]


def assert_nothing_of_segment(failure: Failure, data: bytes, first_damaged: int) -> None:
    """Only intact plaintext before byte ``first_damaged`` was ever delivered, and the
    call that raised did not put any byte from ``first_damaged`` on into its buffer."""
    assert failure.delivered == data[: len(failure.delivered)]
    assert len(failure.delivered) <= first_damaged
    untouched = max(0, first_damaged - failure.last_position)
    assert failure.last_buffer[untouched:] == bytes([SENTINEL]) * (
        len(failure.last_buffer) - untouched
    )


@pytest.fixture(params=["memory", "file"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "memory":
        return MemoryStorage()
    return FileStorage(tmp_path / "store")
