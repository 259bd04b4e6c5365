"""One worker-thread call per buffer: a device's hash, compression, encryption, hash and
file write fused into ``write_blocking`` when every stage below supports it, and the
same bytes and digests as the stage-by-stage path over a store that does not."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import anyio
import pytest

from tests.pipeline.conftest import (
    COMPRESSIONS,
    CONTEXT,
    compressible_data,
    files_under,
    random_data,
    read_all,
    write_in_pieces,
)
from vdistream.engines.process import ProcessProducer, _read_available
from vdistream.pipeline import Key, parse_compression
from vdistream.pipeline.chain import PipelineConfig, SinkChain, SourceChain
from vdistream.storage import FileStorage, MemoryStorage, Storage

MIB = 1 << 20


def config(compression: str, encrypted: bool) -> PipelineConfig:
    return PipelineConfig(
        compression=parse_compression(compression),
        key=Key.generate() if encrypted else None,
        segment_size=64 * 1024,
    )


async def round_trip(storage: Storage, settings: PipelineConfig, data: bytes) -> SinkChain:
    limiter = anyio.CapacityLimiter(4)
    inner = await storage.open_sink("s/dev0", device="dev0")
    chain = SinkChain.build(inner, settings, context=CONTEXT, limiter=limiter)
    await write_in_pieces(chain.outer, data, (MIB, 7, 0, 300_001, 65_536), flush_at=2)
    await chain.outer.commit()
    source = SourceChain.build(
        await storage.open_source("s/dev0"), settings, context=CONTEXT, limiter=limiter
    )
    assert await read_all(source.outer) == data
    await source.outer.close()
    want = hashlib.sha256(data).hexdigest() if settings.hashes_logical else None
    assert source.logical.sha256 == chain.logical.sha256 == want
    assert source.logical.bytes_read == chain.logical.size == len(data)
    assert source.stored.sha256 == chain.stored.sha256 is not None
    return chain


@pytest.mark.asyncio
@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("encrypted", [False, True])
async def test_a_chain_over_files_is_fused(
    tmp_path: Path, compression: str, encrypted: bool
) -> None:
    data = compressible_data(3 * MIB + 12_345)
    settings = config(compression, encrypted)
    chain = await round_trip(FileStorage(tmp_path), settings, data)
    assert chain.outer.blocking_writes  # one thread call per buffer, every stage in it
    stored = (tmp_path / "s" / "dev0").read_bytes()
    assert chain.stored.sha256 == hashlib.sha256(stored).hexdigest()
    assert chain.stored.size == len(stored)


@pytest.mark.asyncio
@pytest.mark.parametrize("encrypted", [False, True])
async def test_a_chain_over_a_store_without_blocking_writes_is_not(encrypted: bool) -> None:
    data = random_data(2 * MIB + 5)
    settings = config("zstd:1", encrypted)
    chain = await round_trip(MemoryStorage(), settings, data)
    assert not chain.outer.blocking_writes
    with pytest.raises(NotImplementedError):
        chain.stored.inner.write_blocking(memoryview(b"x"))


@pytest.mark.asyncio
async def test_a_cancelled_fused_write_writes_nothing(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    inner = await storage.open_sink("k")
    chain = SinkChain.build(
        inner, config("lz4", True), context=CONTEXT, limiter=anyio.CapacityLimiter(1)
    )
    with anyio.CancelScope() as scope:
        scope.cancel()
        await chain.outer.write(memoryview(b"never"))
    assert chain.outer.size == 0
    assert chain.stored.size == 0
    await chain.outer.abort()
    assert not [name for name in files_under(tmp_path) if name.endswith(".tmp")]


def test_reading_what_a_pipe_holds() -> None:
    read, write = os.pipe2(os.O_NONBLOCK)
    try:
        buffer = memoryview(bytearray(MIB))
        assert _read_available(read, buffer) is None  # nothing yet: the caller waits
        os.write(write, b"abc" * 1000)
        assert _read_available(read, buffer) == 3000
        assert bytes(buffer[:6]) == b"abcabc"
        os.write(write, b"z")
        os.close(write)
        write = -1
        assert _read_available(read, buffer) == 1
        assert _read_available(read, buffer) == 0  # the end
    finally:
        os.close(read)
        if write >= 0:
            os.close(write)


@pytest.mark.asyncio
async def test_a_producer_reads_large_output_whole(tmp_path: Path) -> None:
    data = random_data(5 * MIB + 3, seed=9)
    source = tmp_path / "data"
    source.write_bytes(data)
    producer = ProcessProducer(["cat", str(source)])
    got = bytearray()
    buffer = memoryview(bytearray(MIB))
    async with producer.running():
        while count := await producer.readinto(buffer):
            got += buffer[:count]
        await producer.aclose()
    assert bytes(got) == data


@pytest.mark.asyncio
@pytest.mark.parametrize("compression", ["none", "zstd:1"])
async def test_a_new_backup_has_no_logical_digest_and_an_old_one_keeps_it(
    tmp_path: Path, compression: str
) -> None:
    """The AEAD tags (or the frame's checksum) and the stored SHA-256 already cover a
    transformed stream; manifests written before say nothing and are read as hashing
    the logical stream."""
    new = config(compression, True)
    assert not new.hashes_logical
    recorded = new.describe()
    assert recorded["logical_digest"] is None
    assert not PipelineConfig.from_manifest(recorded, new.key).hashes_logical
    old = {key: value for key, value in recorded.items() if key != "logical_digest"}
    before = PipelineConfig.from_manifest(old, new.key)
    assert before.hashes_logical
    data = random_data(MIB + 99, seed=4)
    await round_trip(FileStorage(tmp_path / "new"), new, data)
    chain = await round_trip(FileStorage(tmp_path / "old"), before, data)
    assert chain.logical.sha256 == hashlib.sha256(data).hexdigest()
    compressed = config(compression, False)
    assert compressed.hashes_logical is (not compressed.any)  # no stage: one stream
    assert PipelineConfig().hashes_logical


@pytest.mark.asyncio
@pytest.mark.parametrize("compression", ["zstd:1", "lz4"])
async def test_a_compressed_backup_has_no_logical_digest(tmp_path: Path, compression: str) -> None:
    settings = config(compression, False)
    assert settings.describe()["logical_digest"] is None
    chain = await round_trip(FileStorage(tmp_path), settings, compressible_data(MIB + 1))
    assert chain.logical.sha256 is None
    assert chain.stored.sha256 is not None
