"""The conformance suite itself: each check catches the defect it is named for.

Every broken sink below is a MemorySink with one contract violation; the check that
guards that part of the contract must fail on it (and the real MemorySink passes all
checks in test_memory.py).
"""

from __future__ import annotations

import anyio.lowlevel
import pytest

from vdistream.storage import MemorySink, MemoryStorage, Storage
from vdistream.storage.memory import MemoryStore
from vdistream.testing import check_storage
from vdistream.testing import storage_suite as suite


class OverwritingSink(MemorySink):
    async def commit(self) -> None:
        self._store.objects.pop(self._key, None)  # replaces instead of refusing
        await super().commit()


class RetainingSink(MemorySink):
    """Keeps the caller's views and copies them only at commit."""

    views: list[memoryview]

    async def write(self, data: memoryview, *, position: int | None = None) -> None:
        self.views = [*getattr(self, "views", []), data]
        self._written += data.nbytes

    async def commit(self) -> None:
        for view in getattr(self, "views", []):
            await super().write(view)
        await super().commit()


class EagerSink(MemorySink):
    """Publishes at flush."""

    async def flush(self) -> None:
        self._store.objects[self._key] = bytes(self._buffer)


class TornWriteSink(MemorySink):
    """Copies half, yields, copies the rest: a cancellation in between tears it."""

    async def write(self, data: memoryview, *, position: int | None = None) -> None:
        half = data.nbytes // 2
        await super().write(data[:half])
        await anyio.lowlevel.checkpoint()
        await super().write(data[half:])


class CheckpointingAbort(MemorySink):
    """Lets a pending cancellation skip the cleanup."""

    async def abort(self) -> None:
        await anyio.lowlevel.checkpoint_if_cancelled()
        await super().abort()


class PartialCommitSink(MemorySink):
    """Makes the object visible piece by piece."""

    async def commit(self) -> None:
        self._store.objects[self._key] = bytes(self._buffer[: len(self._buffer) // 2])
        await anyio.lowlevel.checkpoint()
        del self._store.objects[self._key]
        await super().commit()


class NonIdempotentAbort(MemorySink):
    async def abort(self) -> None:
        if self._state.value == "aborted":
            raise RuntimeError("aborted twice")
        await super().abort()


class BrokenStorage(MemoryStorage):
    def __init__(self, sink_class: type[MemorySink]) -> None:
        super().__init__(MemoryStore("broken"))
        self.sink_class = sink_class

    async def open_sink(self, key: str, *, device: str | None = None) -> MemorySink:
        url = f"{self.url}/{key}"
        return self.sink_class(self.store, self._full_key(key), url=url, device=device)


@pytest.mark.parametrize(
    ("sink_class", "check"),
    [
        (OverwritingSink, suite.check_no_overwrite),
        (RetainingSink, suite.check_buffers_not_retained),
        (EagerSink, suite.check_uncommitted_invisible),
        (TornWriteSink, suite.check_cancel_write),
        (CheckpointingAbort, suite.check_cancel_abort),
        (PartialCommitSink, suite.check_cancel_commit),
        (NonIdempotentAbort, suite.check_abort),
    ],
)
@pytest.mark.asyncio
async def test_each_check_catches_its_defect(
    sink_class: type[MemorySink], check: suite.StorageCheck
) -> None:
    await check(MemoryStorage(), None)  # the defect-free sink passes
    with pytest.raises((AssertionError, RuntimeError)):
        await check(BrokenStorage(sink_class), None)


@pytest.mark.asyncio
async def test_residue_exposes_leftovers_the_storage_hides() -> None:
    hidden: list[str] = ["leftover.tmp"]

    async def make() -> Storage:
        return MemoryStorage()

    with pytest.raises(AssertionError, match=r"leftover\.tmp") as caught:
        await check_storage(make, residue=lambda storage: hidden)
    assert "in storage conformance check check_round_trip" in caught.value.__notes__
