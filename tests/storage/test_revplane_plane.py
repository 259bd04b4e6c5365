"""Review of the fused data plane (one worker-thread call per buffer): a chain whose
file write fails after the compressor, the cipher and the hash have consumed the
buffer ends FAILED in every stage, so nothing partial can be committed; a streaming
writeback error is a storage error naming the device and the URL; the pool's lower
priority stays on vdistream's own threads."""

from __future__ import annotations

import asyncio
import errno
import os
import threading

import anyio
import anyio.to_thread
import pytest

from tests.storage.test_disk_full import LIMIT, SmallDisk, small_disk
from tests.storage.test_plane_writeback import Recorder
from vdistream import threads
from vdistream.errors import StorageError, StorageFullError
from vdistream.pipeline import Key, parse_compression, stream_context
from vdistream.pipeline.chain import PipelineConfig, SinkChain
from vdistream.storage import FileStorage, SinkBase, SinkState

__all__ = ("small_disk",)  # the fixture, imported to be used here

MIB = 1 << 20


def _stages(chain: SinkChain) -> list[SinkBase]:
    """Every stateful sink of the chain, outermost first (hashing sinks have none)."""
    found: list[SinkBase] = []
    sink: object = chain.outer
    while sink is not None:
        if isinstance(sink, SinkBase):
            found.append(sink)
        sink = getattr(sink, "inner", None)
    return found


@pytest.mark.asyncio
@pytest.mark.parametrize("compression", ["lz4", "zstd:1", "none"])
async def test_a_fused_write_that_fails_on_the_medium_fails_every_stage(
    small_disk: SmallDisk, compression: str
) -> None:
    storage = FileStorage(small_disk.path)
    settings = PipelineConfig(
        compression=parse_compression(compression), key=Key.generate(), segment_size=64 * 1024
    )
    inner = await storage.open_sink("b/dev0", device="dev0")
    chain = SinkChain.build(
        inner,
        settings,
        context=stream_context("b", 0, 1),
        limiter=anyio.CapacityLimiter(2),
    )
    assert chain.outer.blocking_writes
    data = memoryview(os.urandom(MIB))  # incompressible: the medium fills

    async def fill() -> None:
        for _ in range(2 * LIMIT // MIB + 1):
            await chain.outer.write(data)

    with pytest.raises(StorageFullError) as caught:
        await fill()
    assert caught.value.device == "dev0"
    assert caught.value.url == inner.url
    stages = _stages(chain)
    assert len(stages) == (3 if compression != "none" else 2)
    assert [s._state for s in stages] == [SinkState.FAILED] * len(stages)
    with pytest.raises(Exception, match="failed"):
        await chain.outer.write(data[:10])
    with pytest.raises(Exception, match="failed"):
        await chain.outer.commit()
    await chain.outer.abort()
    assert [s._state for s in stages] == [SinkState.ABORTED] * len(stages)
    assert await storage.list() == []
    assert not any(files for _, _, files in os.walk(small_disk.path))


@pytest.mark.asyncio
async def test_a_writeback_error_is_a_storage_error_of_the_device(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(threads, "_libc_sync_file_range", lambda: Recorder(errno.EIO))
    storage = FileStorage(tmp_path)
    sink = await storage.open_sink("b/dev3", device="dev3")
    window = memoryview(bytes(threads.WRITEBACK_WINDOW))
    with pytest.raises(StorageError) as caught:
        await sink.write(window)
    assert caught.value.device == "dev3"
    assert caught.value.url == sink.url
    assert "dev3" in str(caught.value)
    assert sink.url in str(caught.value)
    assert isinstance(caught.value.__cause__, OSError)
    assert caught.value.__cause__.errno == errno.EIO
    with pytest.raises(StorageError, match="failed"):
        await sink.commit()
    await sink.abort()
    assert await storage.list() == []


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.asyncio
async def test_only_vdistreams_own_pool_threads_are_niced() -> None:
    caller = _nice()
    in_pool = await threads.run_sync(_nice)
    assert in_pool == min(19, caller + threads.WORKER_NICENESS)
    assert _nice() == caller  # the event loop's thread, the embedding app's
    assert await anyio.to_thread.run_sync(_nice) == caller  # anyio's default pool
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, _nice) == caller  # asyncio's default pool

    # a thread the application starts after vdistream's pool exists
    seen: list[int] = []
    started = threading.Thread(target=lambda: seen.append(_nice()))
    started.start()
    started.join()
    assert seen == [caller]
