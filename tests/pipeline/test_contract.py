"""The Sink/Source contract through the stages: cancellation, buffers, states, errors."""

from __future__ import annotations

import functools
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from tests.pipeline.conftest import (
    CONTEXT,
    SEGMENT,
    Chain,
    compressible_data,
    files_under,
    random_data,
    read_all,
    write_in_pieces,
)
from vdistream.errors import (
    KeyMissingError,
    PipelineError,
    StorageExistsError,
    StorageFullError,
)
from vdistream.pipeline import (
    CompressingSink,
    DecompressingSource,
    DecryptingSource,
    EncryptingSink,
    Key,
)
from vdistream.storage import FileStorage, MemoryStorage, Sink, Storage
from vdistream.testing import CANCEL_DELAYS, cancel_during

STAGES = ["zstd", "lz4", "encrypt"]


def make_sink(stage: str, inner: Sink, limiter: anyio.CapacityLimiter | None = None) -> Sink:
    if stage == "encrypt":
        return EncryptingSink(inner, KEY, CONTEXT, segment_size=SEGMENT, limiter=limiter)
    return CompressingSink(inner, stage, None, limiter=limiter)


KEY = Key.generate()


class Blocker:
    """Wraps a stage's codec so that its CPU step blocks in the worker thread until
    released; counts how many such steps are running."""

    def __init__(self, inner: object, method: str) -> None:
        self.inner = inner
        self.method = method
        self.started = threading.Event()
        self.release = threading.Event()
        self.running = 0

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.inner, name)
        if name != self.method:
            return value

        def blocking(*args: Any) -> Any:
            self.running += 1
            try:
                self.started.set()
                assert self.release.wait(10), "never released"
                return value(*args)
            finally:
                self.running -= 1

        return blocking


async def cancel_while_blocked(call: Callable[[], Awaitable[object]], blocker: Blocker) -> None:
    """Run ``call`` in a scope that is cancelled while ``blocker`` holds the worker.

    The call must still complete (it is shielded once started), the scope must then
    be cancelled at the next checkpoint, and the worker must be done by then.
    """
    observed: dict[str, object] = {}

    async def cancel_then_release(scope: anyio.CancelScope) -> None:
        # a thread of the default limiter waits, not the stage's (it may have one token)
        assert await anyio.to_thread.run_sync(blocker.started.wait, 10)
        scope.cancel()
        await anyio.sleep(0.05)
        observed["running after cancel"] = blocker.running  # the thread is not abandoned
        blocker.release.set()

    async with anyio.create_task_group() as group:
        scope = anyio.CancelScope()
        group.start_soon(cancel_then_release, scope)
        with scope:
            await call()
            observed["returned"] = True
            await anyio.sleep(10)  # the cancellation lands here
            pytest.fail("the scope was not cancelled")
    assert scope.cancelled_caught
    assert observed == {"running after cancel": 1, "returned": True}
    assert blocker.running == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("stage", STAGES)
async def test_cancel_during_the_cpu_step_of_a_write(tmp_path: Path, stage: str) -> None:
    storage = FileStorage(tmp_path / "store")
    limiter = anyio.CapacityLimiter(2)
    sink = make_sink(stage, await storage.open_sink("k", device="dev0"), limiter)
    attribute, method = ("_cipher", "seal_into") if stage == "encrypt" else ("_encoder", "compress")
    blocker = Blocker(getattr(sink, attribute), method)
    setattr(sink, attribute, blocker)
    data = random_data(3 * SEGMENT)
    await cancel_while_blocked(lambda: sink.write(memoryview(data)), blocker)
    assert sink.bytes_written == len(data)  # the write that had started finished
    assert limiter.borrowed_tokens == 0
    assert files_under(storage.path) != []
    await sink.abort()
    assert files_under(storage.path) == []
    with pytest.raises(PipelineError, match="aborted"):
        await sink.write(memoryview(b"more"))


@pytest.mark.asyncio
@pytest.mark.parametrize("stage", STAGES)
async def test_cancel_during_the_cpu_step_of_commit(tmp_path: Path, stage: str) -> None:
    storage = FileStorage(tmp_path / "store")
    limiter = anyio.CapacityLimiter(1)
    sink = make_sink(stage, await storage.open_sink("k", device="dev0"), limiter)
    data = compressible_data(50_000)
    await sink.write(memoryview(data))
    attribute, method = ("_cipher", "seal_into") if stage == "encrypt" else ("_encoder", "finish")
    blocker = Blocker(getattr(sink, attribute), method)
    setattr(sink, attribute, blocker)
    await cancel_while_blocked(sink.commit, blocker)
    assert limiter.borrowed_tokens == 0
    assert files_under(storage.path) == ["k"]  # the commit completed: all or nothing
    source = await storage.open_source("k")
    wrapped = (
        DecryptingSource(source, KEY, CONTEXT)
        if stage == "encrypt"
        else DecompressingSource(source, stage)
    )
    async with wrapped:
        assert await read_all(wrapped) == data


@pytest.mark.asyncio
@pytest.mark.parametrize("stage", STAGES)
async def test_cancel_during_the_cpu_step_of_a_read(tmp_path: Path, stage: str) -> None:
    storage = FileStorage(tmp_path / "store")
    data = compressible_data(100_000)
    sink = make_sink(stage, await storage.open_sink("k"))
    await sink.write(memoryview(data))
    await sink.commit()
    limiter = anyio.CapacityLimiter(1)
    inner = await storage.open_source("k")
    source: DecryptingSource | DecompressingSource
    if stage == "encrypt":
        source = DecryptingSource(inner, KEY, CONTEXT, limiter=limiter)
        await source.read_header()
        attribute, method = "_cipher", "open_into"
    else:
        source = DecompressingSource(inner, stage, limiter=limiter)
        attribute, method = "_decoder", "decode"
    blocker = Blocker(getattr(source, attribute), method)
    setattr(source, attribute, blocker)
    buffer = memoryview(bytearray(1000))
    count: list[int] = []

    async def read() -> None:
        count.append(await source.readinto(buffer))

    await cancel_while_blocked(read, blocker)
    assert count == [1000]
    assert bytes(buffer) == data[:1000]
    assert limiter.borrowed_tokens == 0
    async with source:
        assert await read_all(source) == data[1000:]  # the stream is still consistent


@pytest.mark.asyncio
@pytest.mark.parametrize("stage", STAGES)
async def test_cancelled_before_starting_does_nothing(stage: str) -> None:
    storage = MemoryStorage()
    sink = make_sink(stage, await storage.open_sink("k"))
    with anyio.CancelScope() as scope:
        scope.cancel()
        await sink.write(memoryview(b"lost"))
    assert scope.cancelled_caught
    assert sink.bytes_written == 0
    with anyio.CancelScope() as scope:
        scope.cancel()
        await sink.commit()
    assert scope.cancelled_caught
    assert await storage.list() == []
    await sink.write(memoryview(b"kept"))  # the sink is still open and consistent
    await sink.commit()
    source = await storage.open_source("k")
    reader = (
        DecryptingSource(source, KEY, CONTEXT)
        if stage == "encrypt"
        else DecompressingSource(source, stage)
    )
    with anyio.CancelScope() as scope:
        scope.cancel()
        await reader.readinto(memoryview(bytearray(10)))
    assert scope.cancelled_caught
    assert await read_all(reader) == b"kept"


@pytest.mark.asyncio
@pytest.mark.parametrize("compression", ["zstd:3", "lz4", "none"])
async def test_cancellation_at_any_moment_keeps_the_stream_consistent(
    tmp_path: Path, compression: str
) -> None:
    """Whatever each write was told (done or cancelled), the result is what was accepted."""
    storage = FileStorage(tmp_path / "store")
    chain = Chain.of(compression, encrypted=True)
    sink = await chain.open_sink(storage, "k")
    accepted = bytearray()
    for number, delay in enumerate(CANCEL_DELAYS):
        piece = random_data(5000 + 997 * number, seed=number)
        before = sink.bytes_written
        done = await cancel_during(functools.partial(sink.write, memoryview(piece)), delay)
        assert sink.bytes_written in (before, before + len(piece))
        assert done == (sink.bytes_written == before + len(piece))
        if done:
            accepted += piece
        await cancel_during(sink.flush, delay)
    while not await cancel_during(sink.commit, 3):
        pass
    async with await chain.open_source(storage, "k") as source:
        assert await read_all(source) == bytes(accepted)


@pytest.mark.asyncio
@pytest.mark.parametrize("stage", STAGES)
async def test_abort_removes_everything_even_when_cancelled(tmp_path: Path, stage: str) -> None:
    storage = FileStorage(tmp_path / "store")
    sink = make_sink(stage, await storage.open_sink("k", device="dev0"))
    await write_in_pieces(sink, random_data(100_000))
    await sink.flush()
    assert files_under(storage.path) != []
    with anyio.CancelScope() as scope:
        scope.cancel()
        await sink.abort()  # runs to completion in a cancelled scope
    assert files_under(storage.path) == []
    await sink.abort()  # idempotent
    for call in (sink.flush, sink.commit):
        with pytest.raises(PipelineError, match="aborted"):
            await call()


@pytest.mark.asyncio
@pytest.mark.parametrize("stage", STAGES)
async def test_leaving_async_with_without_commit_aborts(tmp_path: Path, stage: str) -> None:
    storage = FileStorage(tmp_path / "store")

    async def fail_half_way() -> None:
        async with make_sink(stage, await storage.open_sink("k")) as sink:
            await sink.write(memoryview(random_data(70_000)))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await fail_half_way()
    assert files_under(storage.path) == []


@pytest.mark.asyncio
@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
@pytest.mark.parametrize("compression", ["zstd:3", "lz4", "none"])
async def test_buffers_are_not_retained(compression: str, encrypted: bool) -> None:
    """After each call the buffer can be released, resized and overwritten (it is
    shared memory going back to the engine) without affecting the result."""
    storage = MemoryStorage()
    chain = Chain.of(compression, encrypted)
    data = compressible_data(150_000) + random_data(50_000)
    sink = await chain.open_sink(storage, "k")
    for start in range(0, len(data), 30_000):
        shared = bytearray(data[start : start + 30_000])
        view = memoryview(shared)
        await sink.write(view)
        view.release()  # BufferError if a stage kept an export of it
        shared[:] = b"\xff" * len(shared)
        shared.extend(b"resized")  # BufferError if anything still points into it
    await sink.flush()
    await sink.commit()

    source = await chain.open_source(storage, "k")
    out = bytearray()
    while True:
        shared = bytearray(12_345)
        view = memoryview(shared)
        count = await source.readinto(view)
        view.release()
        out += shared[:count]
        shared.extend(b"resized")
        if not count:
            break
    assert out == data


@pytest.mark.asyncio
@pytest.mark.parametrize("stage", STAGES)
async def test_only_sequential_positions_are_accepted(stage: str) -> None:
    storage = MemoryStorage()
    sink = make_sink(stage, await storage.open_sink("k", device="dev3"))
    assert not sink.random_access
    await sink.write(memoryview(b"abc"), position=0)
    await sink.write(memoryview(b"def"), position=3)
    with pytest.raises(PipelineError, match=r"sequential.*next byte is 6.*dev3") as raised:
        await sink.write(memoryview(b"x"), position=0)
    assert "memory://" in str(raised.value)
    await sink.write(memoryview(b"ghi"))  # a refused position changed nothing
    await sink.commit()
    source = await storage.open_source("k")
    reader = (
        DecryptingSource(source, KEY, CONTEXT)
        if stage == "encrypt"
        else DecompressingSource(source, stage)
    )
    assert not reader.random_access
    assert reader.size is None
    buffer = memoryview(bytearray(4))
    assert await reader.readinto(buffer, position=0) == 4
    with pytest.raises(PipelineError, match="sequential"):
        await reader.readinto(buffer, position=0)
    assert await reader.readinto(buffer, position=4) == 4
    assert await reader.readinto(buffer) == 1
    assert bytes(buffer[:1]) == b"i"


@pytest.mark.asyncio
@pytest.mark.parametrize("stage", STAGES)
async def test_a_refused_commit_can_be_retried(stage: str) -> None:
    """StorageExistsError from the inner commit: delete the old object, commit again."""
    storage = MemoryStorage()
    await storage.write_bytes("k", b"an older object")
    sink = make_sink(stage, await storage.open_sink("k"))
    data = compressible_data(80_000)
    await sink.write(memoryview(data))
    with pytest.raises(StorageExistsError):
        await sink.commit()
    with pytest.raises(PipelineError, match="finished"):
        await sink.write(memoryview(b"too late"))
    await storage.delete("k")
    await sink.commit()
    await sink.commit()
    await sink.abort()  # a no-op after commit
    source = await storage.open_source("k")
    reader = (
        DecryptingSource(source, KEY, CONTEXT)
        if stage == "encrypt"
        else DecompressingSource(source, stage)
    )
    assert await read_all(reader) == data


class _FullAfter(Sink):
    """A sink whose medium fills up after ``limit`` bytes."""

    def __init__(self, inner: Sink, limit: int) -> None:
        self.inner = inner
        self.limit = limit
        self.url = inner.url
        self.device = inner.device

    @property
    def random_access(self) -> bool:
        return False

    @property
    def bytes_written(self) -> int:
        return self.inner.bytes_written

    @property
    def size(self) -> int:
        return self.inner.size

    async def write(self, data: memoryview, *, position: int | None = None) -> None:
        if self.inner.size + data.nbytes > self.limit:
            raise StorageFullError("no space left", url=self.url, device=self.device)
        await self.inner.write(data, position=position)

    async def flush(self) -> None:
        await self.inner.flush()

    async def commit(self) -> None:
        await self.inner.commit()

    async def abort(self) -> None:
        await self.inner.abort()


@pytest.mark.asyncio
@pytest.mark.parametrize("stage", STAGES)
async def test_an_inner_failure_leaves_the_stage_failed(stage: str) -> None:
    storage = MemoryStorage()
    sink = make_sink(stage, _FullAfter(await storage.open_sink("k", device="dev1"), 10_000))
    with pytest.raises(StorageFullError):
        await write_in_pieces(sink, random_data(3_000_000), (1 << 20,))
    with pytest.raises(PipelineError, match=r"earlier write.*failed.*dev1"):
        await sink.write(memoryview(b"x"))
    with pytest.raises(PipelineError, match="failed"):
        await sink.commit()
    await sink.abort()
    assert await storage.list() == []


@pytest.mark.asyncio
async def test_bad_stage_arguments_are_refused_clearly() -> None:
    storage = MemoryStorage()
    inner = await storage.open_sink("k")
    with pytest.raises(PipelineError, match=r"zstd level 20 is out of range 1\.\.19"):
        CompressingSink(inner, "zstd", 20)
    with pytest.raises(PipelineError, match="lz4 takes no level"):
        CompressingSink(inner, "lz4", 1)
    with pytest.raises(PipelineError, match=r"unknown compression algorithm 'gzip'.*memory://"):
        CompressingSink(inner, "gzip", None)
    with pytest.raises(PipelineError, match="unknown compression algorithm 'none'"):
        DecompressingSource(await _source(storage), "none")
    with pytest.raises(PipelineError, match="segment size 100 is out of range"):
        EncryptingSink(inner, KEY, b"", segment_size=100)
    secret = b"S3cr3t-key-material-31-bytes..."
    with pytest.raises(PipelineError, match="32 bytes, got 31") as raised:
        EncryptingSink(inner, secret, b"")
    assert secret.decode() not in str(raised.value)
    with pytest.raises(KeyMissingError):
        EncryptingSink(inner, None, b"")


async def _source(storage: Storage) -> Any:
    await storage.write_bytes("src", b"")
    return await storage.open_source("src")


@pytest.mark.asyncio
async def test_keys_are_accepted_as_key_objects_or_raw_bytes() -> None:
    storage = MemoryStorage()
    sink = EncryptingSink(await storage.open_sink("k"), KEY.reveal(), b"c", segment_size=1024)
    await sink.write(memoryview(b"hello"))
    await sink.commit()
    source = DecryptingSource(await storage.open_source("k"), KEY, b"c")
    assert await read_all(source) == b"hello"
