"""vdistream.threads: one bounded pool for file I/O, fsync and hashing; shielded waits."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from vdistream import threads
from vdistream.pipeline import HashingSink
from vdistream.storage import FileStorage


def test_importing_the_package_starts_no_pool() -> None:
    code = "import vdistream, vdistream.threads as t; print(t._pool is None)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "True"


@pytest.mark.asyncio
async def test_calls_run_in_the_bounded_pool() -> None:
    name = await threads.run_sync(lambda: threading.current_thread().name)
    assert name.startswith("vdistream-io")
    assert threads.executor()._max_workers == threads.MAX_WORKERS
    assert threads.executor() is threads.executor()


@pytest.mark.asyncio
async def test_a_started_call_is_waited_for_when_cancelled() -> None:
    started, release = threading.Event(), threading.Event()
    finished: list[bool] = []

    def work() -> None:
        started.set()
        assert release.wait(10)
        finished.append(True)

    async def cancel_then_release(scope: anyio.CancelScope) -> None:
        assert await anyio.to_thread.run_sync(started.wait, 10)
        scope.cancel()
        await anyio.sleep(0.05)
        release.set()

    returned: list[bool] = []
    async with anyio.create_task_group() as group:
        with anyio.CancelScope() as scope:
            group.start_soon(cancel_then_release, scope)
            await threads.run_sync(work)
            returned.append(finished == [True])  # back only once the thread is done
            await anyio.sleep(10)  # the cancellation lands here
    assert scope.cancelled_caught
    assert returned == [True]


@pytest.mark.asyncio
async def test_a_call_cancelled_before_it_starts_does_nothing() -> None:
    ran: list[bool] = []
    with anyio.CancelScope() as scope:
        scope.cancel()
        await threads.run_sync(lambda: ran.append(True))
    assert scope.cancelled_caught
    assert ran == []


@pytest.mark.asyncio
async def test_the_limiter_token_is_held_while_the_call_runs() -> None:
    limiter = anyio.CapacityLimiter(1)
    held = await threads.run_sync(lambda: limiter.borrowed_tokens, limiter=limiter)
    assert held == 1
    assert limiter.borrowed_tokens == 0


class _Recorder:
    """Stands in for a hashlib object, noting the thread of each update."""

    def __init__(self, inner: object, seen: list[str]) -> None:
        self.inner, self.seen = inner, seen

    def update(self, data: memoryview) -> None:
        self.seen.append("hash " + threading.current_thread().name)
        self.inner.update(data)  # type: ignore[attr-defined]

    def hexdigest(self) -> str:
        return str(self.inner.hexdigest())  # type: ignore[attr-defined]


@pytest.mark.asyncio
async def test_file_writes_fsync_and_hashing_share_the_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        seen.append("fsync " + threading.current_thread().name)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    storage = FileStorage(tmp_path)
    inner = await storage.open_sink("k")
    assert inner._file._executor is threads.executor()  # aiofiles writes go there too
    sink = HashingSink(inner)
    sink._hasher = _Recorder(sink._hasher, seen)  # type: ignore[assignment]
    data = os.urandom(1 << 20)  # large enough to be hashed in a thread
    await sink.write(memoryview(data))
    await sink.flush()
    await sink.commit()
    assert (tmp_path / "k").read_bytes() == data
    assert sink.sha256 == hashlib.sha256(data).hexdigest()
    assert {entry.split()[0] for entry in seen} == {"fsync", "hash"}
    assert all(entry.split()[1].startswith("vdistream-io") for entry in seen), seen


@pytest.mark.asyncio
async def test_a_call_waiting_for_a_thread_can_be_cancelled_and_never_runs() -> None:
    """With every thread busy, a call waits for a token, not in the pool's queue: a
    cancellation ends that wait at once, and the call never runs later."""
    release = threading.Event()
    ran: list[bool] = []

    async def busy() -> None:
        await threads.run_sync(release.wait, 10)

    async with anyio.create_task_group() as group:
        for _ in range(threads.MAX_WORKERS):
            group.start_soon(busy)
        await anyio.sleep(0.1)  # every token is held now
        with anyio.move_on_after(0.2) as scope:
            await threads.run_sync(lambda: ran.append(True))
        assert scope.cancelled_caught
        release.set()
    await threads.run_sync(lambda: None)  # the pool is free again
    assert ran == []


@pytest.mark.asyncio
async def test_calls_see_the_callers_context() -> None:
    """Log fields bound per job (structlog's contextvars) reach calls in the pool."""
    import contextvars

    job = contextvars.ContextVar[str]("job")
    job.set("job-42")
    assert await threads.run_sync(job.get) == "job-42"


@pytest.mark.asyncio
async def test_the_pool_keeps_no_view_of_the_callers_buffer_after_the_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pool thread drops its work item only after the caller may have resumed; a view
    of an mmap kept by that work item would keep the mmap from closing (the device set's
    buffer area). The worker is held right after the result is set, which is that race
    made certain."""
    import concurrent.futures.thread
    import mmap

    original = concurrent.futures.thread._WorkItem.run
    held = threading.Event()

    def run_then_linger(self: Any) -> None:
        original(self)
        held.wait(5)  # the work item (and what it was given) is still alive here

    monkeypatch.setattr(concurrent.futures.thread._WorkItem, "run", run_then_linger)
    area = mmap.mmap(-1, 4096)
    try:
        with memoryview(area) as view:
            assert await threads.run_sync(bytes, view[:16]) == bytes(16)
        area.close()  # BufferError if the lingering work item still held the slice
    finally:
        held.set()
        await anyio.sleep(0.01)
