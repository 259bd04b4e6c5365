"""Producers and consumers: the ways bytes get into a backup and out of a restore."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.engines.fake_client import CHUNK, OPTIONS, FakeClient, backup, restore, run_job
from vdistream import Registry
from vdistream.engines import (
    BytesConsumer,
    BytesProducer,
    CallableConsumer,
    CallableProducer,
    FileConsumer,
    FileProducer,
    IterableProducer,
    StripedBackup,
    StripedRestore,
    as_consumer,
    as_producer,
)

pytestmark = pytest.mark.asyncio

DATA = random.Random(11).randbytes(3 * CHUNK + 1234)


async def streams_from(source: object) -> list[bytes]:
    registry = Registry()
    client = FakeClient(registry, 2)
    result = await run_job(StripedBackup(source, OPTIONS), client, registry)  # type: ignore[arg-type]
    assert result.logical_bytes == len(DATA)
    return client.streams


async def test_file_to_file(tmp_path: Path) -> None:
    source = tmp_path / "db.bin"
    source.write_bytes(DATA)
    streams = await streams_from(str(source))  # a str path works as well as a Path
    assert len(await streams_from(source)) == 2
    target = tmp_path / "out" / "restored.bin"
    target.parent.mkdir()
    registry = Registry()
    client = FakeClient(registry, 2, streams=streams)
    await run_job(StripedRestore(target, OPTIONS), client, registry)
    assert target.read_bytes() == DATA
    assert list(target.parent.iterdir()) == [target]  # the .partial file was renamed


async def test_empty_file_restores_to_an_empty_file(tmp_path: Path) -> None:
    source = tmp_path / "empty"
    source.write_bytes(b"")
    client, _ = await backup(Registry(), b"", 3)
    target = tmp_path / "restored"
    registry = Registry()
    fake = FakeClient(registry, 3, streams=client.streams)
    await run_job(StripedRestore(FileConsumer(target), OPTIONS), fake, registry)
    assert target.read_bytes() == b""


async def test_async_callable_producer_and_consumer() -> None:
    offset = 0

    async def fill(view: memoryview) -> int:
        nonlocal offset
        count = min(view.nbytes, 1000, len(DATA) - offset)  # short reads are fine
        view[:count] = DATA[offset : offset + count]
        offset += count
        return count

    streams = await streams_from(fill)
    collected = bytearray()

    async def write(view: memoryview) -> None:
        collected.extend(view)

    registry = Registry()
    client = FakeClient(registry, 2, streams=streams)
    await run_job(StripedRestore(write, OPTIONS), client, registry)
    assert bytes(collected) == DATA


async def test_iterables_of_chunks() -> None:
    pieces = [DATA[i : i + 7777] for i in range(0, len(DATA), 7777)]

    async def agen() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    for source in (agen(), pieces, iter(pieces)):
        restored, _, _ = await restore(Registry(), await streams_from(source))
        assert restored == DATA


async def test_coercion() -> None:
    assert isinstance(as_producer(b"x"), BytesProducer)
    assert isinstance(as_producer(bytearray(b"x")), BytesProducer)
    assert isinstance(as_producer(memoryview(b"x")), BytesProducer)
    assert isinstance(as_producer("some/path"), FileProducer)
    assert isinstance(as_producer(Path("p")), FileProducer)
    assert isinstance(as_producer([b"a"]), IterableProducer)

    async def fill(view: memoryview) -> int:
        return 0

    assert isinstance(as_producer(fill), CallableProducer)
    producer = BytesProducer(b"")
    assert as_producer(producer) is producer
    consumer = BytesConsumer()
    assert as_consumer(consumer) is consumer
    assert isinstance(as_consumer("p"), FileConsumer)

    async def write(view: memoryview) -> None:
        pass

    assert isinstance(as_consumer(write), CallableConsumer)
    with pytest.raises(TypeError):
        as_producer(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        as_consumer(42)  # type: ignore[arg-type]


async def test_a_lying_producer_is_an_engine_error(registry: Registry) -> None:
    from vdistream.engines import EngineError

    async def fill(view: memoryview) -> int:
        return view.nbytes + 1

    client = FakeClient(registry, 1)
    with pytest.raises(EngineError, match="producer"):
        await run_job(StripedBackup(fill, OPTIONS), client, registry)
    assert client.aborted
