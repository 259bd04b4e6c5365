"""Every combination of stages gives back exactly what was written."""

from __future__ import annotations

import hashlib
from pathlib import Path

import anyio
import lz4.frame  # type: ignore[import-untyped]
import pytest
import zstandard

from tests.pipeline.conftest import (
    COMPRESSIONS,
    CONTEXT,
    SEGMENT,
    Chain,
    compressible_data,
    files_under,
    random_data,
    read_all,
    read_until_error,
    write_in_pieces,
)
from vdistream.errors import CorruptStreamError
from vdistream.pipeline import (
    CompressingSink,
    DecompressingSource,
    DecryptingSource,
    EncryptingSink,
    HashingSink,
    HashingSource,
    Key,
    parse_compression,
)
from vdistream.pipeline.encrypt import DEFAULT_SEGMENT_SIZE, HEADER_SIZE
from vdistream.storage import FileSink, FileStorage, MemoryStorage, Sink, Source, Storage

DATA = {
    "random": random_data(300_007),
    "compressible": compressible_data(700_001),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", sorted(DATA))
@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
@pytest.mark.parametrize("compression", COMPRESSIONS)
async def test_round_trip(storage: Storage, compression: str, encrypted: bool, kind: str) -> None:
    data = DATA[kind]
    chain = Chain.of(compression, encrypted)
    sink = await chain.open_sink(storage, "db/dev0.bak")
    await write_in_pieces(sink, data, flush_at=4)
    assert sink.bytes_written == len(data)
    assert sink.size == len(data)
    await sink.commit()
    await sink.commit()  # committing twice is a no-op
    stored = await storage.read_bytes("db/dev0.bak")
    if compression != "none" and kind == "compressible":
        assert len(stored) < len(data) // 2
    if encrypted:
        assert data[1000:1100] not in stored
    async with await chain.open_source(storage, "db/dev0.bak") as source:
        assert await read_all(source) == data
    if isinstance(storage, FileStorage):
        assert files_under(storage.path) == ["db/dev0.bak"]  # no temporaries left


@pytest.mark.asyncio
@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
@pytest.mark.parametrize("compression", COMPRESSIONS)
async def test_empty_stream(compression: str, encrypted: bool) -> None:
    storage = MemoryStorage()
    chain = Chain.of(compression, encrypted)
    sink = await chain.open_sink(storage, "empty")
    await sink.write(memoryview(b""))
    await sink.commit()
    source = await chain.open_source(storage, "empty")
    assert await source.readinto(memoryview(bytearray(100))) == 0
    assert await source.readinto(memoryview(bytearray(100))) == 0


async def _intact_prefix(source: Source, size: int) -> bytes:
    """What ``source`` delivers before it reports that the stream is cut short."""
    async with source:
        failure = await read_until_error(source, size)
    assert isinstance(failure.error, CorruptStreamError)
    assert "truncated" in str(failure.error)
    return failure.delivered


@pytest.mark.asyncio
@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
@pytest.mark.parametrize("compression", ["none", "zstd:3", "lz4"])
async def test_flush_makes_everything_written_so_far_readable(
    tmp_path: Path, compression: str, encrypted: bool
) -> None:
    """After flush, the bytes that reached the medium decode to all data written so far."""
    storage = FileStorage(tmp_path / "store")
    chain = Chain.of(compression, encrypted)
    data = compressible_data(50_000) + random_data(20_000)
    inner = await storage.open_sink("k", device="dev0")
    sink = chain.wrap_sink(inner)
    await sink.write(memoryview(data[:30_001]))
    await sink.flush()
    assert isinstance(inner, FileSink)
    flushed = inner.temp_path.read_bytes()
    await sink.write(memoryview(data[30_001:]))  # and the stream continues
    await sink.flush()
    await sink.commit()
    async with await chain.open_source(storage, "k") as source:
        assert await read_all(source) == data

    # The flushed prefix is a stream without its end: all its data, then "truncated".
    # Decoded layer by layer, because a read call that meets the damage raises and
    # delivers nothing, so an outer stage reading large chunks never sees the last
    # intact bytes. 1579 divides 30_001, so the intact bytes end where a call ends.
    copy = MemoryStorage()
    prefix = flushed
    if encrypted:
        await copy.write_bytes("encrypted", prefix)
        decrypting = DecryptingSource(await copy.open_source("encrypted"), chain.key, CONTEXT)
        prefix = await _intact_prefix(decrypting, 1579 if compression == "none" else 1)
    if compression != "none":
        await copy.write_bytes("compressed", prefix)
        algorithm = chain.compression.algorithm
        decompressing = DecompressingSource(await copy.open_source("compressed"), algorithm)
        prefix = await _intact_prefix(decompressing, 1579)
    assert prefix == data[:30_001]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "size", [0, 1, DEFAULT_SEGMENT_SIZE - 1, 2 * DEFAULT_SEGMENT_SIZE, 2_500_000]
)
async def test_default_segment_size(size: int) -> None:
    """Segment boundaries with the default size, including an exact multiple of it."""
    storage = MemoryStorage()
    key = Key.generate()
    data = random_data(size, seed=size)
    sink = EncryptingSink(await storage.open_sink("k"), key, b"ctx")
    await write_in_pieces(sink, data, (1_048_575, 3, 65_536, 1_048_576))
    await sink.commit()
    stored = await storage.read_bytes("k")
    full, rest = divmod(size, DEFAULT_SEGMENT_SIZE)
    # header, full segments, then the final one (empty when size is a multiple)
    assert len(stored) == HEADER_SIZE + full * (DEFAULT_SEGMENT_SIZE + 20) + rest + 20
    source = DecryptingSource(await storage.open_source("k"), key, b"ctx")
    assert await read_all(source, (1_000_000, 48_577)) == data


@pytest.mark.asyncio
async def test_the_highest_zstd_level() -> None:
    """Level 19 uses the largest window the decoder accepts from our own streams."""
    storage = MemoryStorage()
    chain = Chain.of("zstd:19", encrypted=False)
    data = compressible_data(300_000) + random_data(30_000)
    sink = await chain.open_sink(storage, "k")
    await write_in_pieces(sink, data, (100_000,))
    await sink.commit()
    assert await read_all(await chain.open_source(storage, "k")) == data


@pytest.mark.asyncio
async def test_a_zstd_frame_asking_for_a_huge_window_is_refused() -> None:
    """A frame (hostile, or from another tool) cannot make the decoder allocate 128 MiB."""
    storage = MemoryStorage()
    params = zstandard.ZstdCompressionParameters(window_log=27)
    frame = zstandard.ZstdCompressor(compression_params=params).compressobj()
    await storage.write_bytes("k", frame.compress(random_data(1000)) + frame.flush())
    source = DecompressingSource(await storage.open_source("k"), "zstd")
    with pytest.raises(CorruptStreamError, match=r"memory.*memory://default/k"):
        await source.readinto(memoryview(bytearray(100)))


@pytest.mark.asyncio
@pytest.mark.parametrize("compression", ["zstd:3", "lz4"])
async def test_compressed_object_is_a_standard_frame(compression: str) -> None:
    """Without encryption, ``zstd -d`` / ``lz4 -d`` can read the stored object."""
    storage = MemoryStorage()
    data = compressible_data(300_000)
    spec = parse_compression(compression)
    sink = CompressingSink(await storage.open_sink("k"), spec.algorithm, spec.level)
    await write_in_pieces(sink, data, flush_at=2)
    await sink.commit()
    stored = await storage.read_bytes("k")
    if spec.algorithm == "zstd":
        reader = zstandard.ZstdDecompressor().stream_reader(stored)
        assert reader.read(len(data) + 1) == data
    else:
        assert lz4.frame.decompress(stored) == data


@pytest.mark.asyncio
async def test_the_integrators_chain_with_both_hashes() -> None:
    """engine -> logical hash -> compress -> encrypt -> stored hash -> storage, and back."""
    storage = MemoryStorage()
    key = Key.generate()
    # One token shared by every stage: no stage holds a token while waiting for another.
    limiter = anyio.CapacityLimiter(1)
    data = compressible_data(400_000) + random_data(300_000)
    stored_hash = HashingSink(await storage.open_sink("k", device="dev0"), limiter=limiter)
    encrypt = EncryptingSink(stored_hash, key, b"ctx", limiter=limiter)
    compress = CompressingSink(encrypt, "zstd", 3, limiter=limiter)
    logical_hash = HashingSink(compress, limiter=limiter)
    await write_in_pieces(logical_hash, data)
    await logical_hash.commit()
    stored = await storage.read_bytes("k")
    assert logical_hash.sha256 == hashlib.sha256(data).hexdigest()
    assert stored_hash.sha256 == hashlib.sha256(stored).hexdigest()

    stored_check = HashingSource(await storage.open_source("k"), limiter=limiter)
    logical_check = HashingSource(
        DecompressingSource(
            DecryptingSource(stored_check, key, b"ctx", limiter=limiter), "zstd", limiter=limiter
        ),
        limiter=limiter,
    )
    assert await read_all(logical_check) == data
    assert logical_check.sha256 == logical_hash.sha256
    assert stored_check.sha256 == stored_hash.sha256
    assert limiter.borrowed_tokens == 0


@pytest.mark.asyncio
async def test_devices_in_parallel_share_a_limiter() -> None:
    storage = MemoryStorage()
    limiter = anyio.CapacityLimiter(2)
    datas = [compressible_data(200_000, seed=n) + random_data(50_000, seed=n) for n in range(5)]
    chains = [Chain.of("zstd:3", encrypted=True, limiter=limiter) for _ in datas]

    async def back_up(number: int) -> None:
        sink = await chains[number].open_sink(storage, f"dev{number}", device=f"dev{number}")
        await write_in_pieces(sink, datas[number])
        await sink.commit()

    async with anyio.create_task_group() as group:
        for number in range(len(datas)):
            group.start_soon(back_up, number)
    assert limiter.borrowed_tokens == 0
    for number, data in enumerate(datas):
        assert await read_all(await chains[number].open_source(storage, f"dev{number}")) == data


class _CountingSink(Sink):
    """A memory sink that records the size of every write it receives."""

    def __init__(self, inner: Sink) -> None:
        self.inner = inner
        self.url = inner.url
        self.device = inner.device
        self.writes: list[int] = []

    @property
    def random_access(self) -> bool:
        return self.inner.random_access

    @property
    def bytes_written(self) -> int:
        return self.inner.bytes_written

    @property
    def size(self) -> int:
        return self.inner.size

    async def write(self, data: memoryview, *, position: int | None = None) -> None:
        self.writes.append(data.nbytes)
        await self.inner.write(data, position=position)

    async def flush(self) -> None:
        await self.inner.flush()

    async def commit(self) -> None:
        await self.inner.commit()

    async def abort(self) -> None:
        await self.inner.abort()


@pytest.mark.asyncio
async def test_compressed_output_reaches_storage_in_large_writes() -> None:
    storage = MemoryStorage()
    counting = _CountingSink(await storage.open_sink("k"))
    sink = CompressingSink(counting, "lz4", None)
    data = random_data(3_000_000)
    await write_in_pieces(sink, data, (4096,))  # 733 small writes
    assert all(size >= 1 << 20 for size in counting.writes)
    assert len(counting.writes) <= 3
    await sink.commit()
    assert await read_all(DecompressingSource(await storage.open_source("k"), "lz4")) == data


@pytest.mark.asyncio
async def test_encrypted_output_reaches_storage_one_segment_per_write() -> None:
    storage = MemoryStorage()
    counting = _CountingSink(await storage.open_sink("k"))
    sink = EncryptingSink(counting, Key.generate(), b"", segment_size=SEGMENT)
    await write_in_pieces(sink, random_data(10 * SEGMENT + 5), (1000,))
    await sink.commit()
    assert counting.writes == [HEADER_SIZE] + [SEGMENT + 20] * 10 + [5 + 20]


@pytest.mark.asyncio
@pytest.mark.parametrize("algorithm", ["zstd", "lz4"])
async def test_decoded_output_stays_bounded_for_extreme_ratios(algorithm: str) -> None:
    """64 MiB of zeros compress to almost nothing; decoding must not inflate at once."""
    storage = MemoryStorage()
    sink = CompressingSink(await storage.open_sink("k"), algorithm, None)
    zeros = memoryview(bytes(4 << 20))
    for _ in range(16):
        await sink.write(zeros)
    await sink.commit()
    assert await storage.stat("k") < 1 << 20
    source = DecompressingSource(await storage.open_source("k"), algorithm)
    buffer = memoryview(bytearray(1 << 20))
    total = 0
    largest = 0
    while count := await source.readinto(buffer):
        total += count
        # the decoded-but-undelivered buffer: at most the budget plus one zstd block
        largest = max(largest, len(source._out))
    assert total == 64 << 20
    assert largest <= (1 << 20) + (128 << 10)
