"""What the object stores' streams (S3, Azure Blob) share.

``PieceSink``: a stream cut into numbered pieces (S3 parts, Azure blocks), each sent by
a call in the sink's task group while ``write`` fills the next buffer; at most the
backend's bound are in flight, and a write that fills a piece while that many are in
flight waits for one. ``flush`` waits for every piece cut so far.

``RangedSource``: an object read in aligned ranges with bounded read-ahead. Reads are
chunks of ``chunk_size`` at multiples of it, each fetched by the backend's
``_fetch(index)``. While reading sequentially inside ``async with source`` (or a job's
``storage.background()``) it keeps ``_read_ahead()`` further chunks in flight in that
task group; without one, a read fetches at most the chunks it ends in, ``_read_ahead()``
at a time. A read at another position drops the read-ahead. Memory is at most
``read_ahead + 1`` chunks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Generic, TypeVar

from vdistream.errors import StorageIntegrityError
from vdistream.storage.base import SinkBase, SourceBase
from vdistream.storage.s3.tasks import Call, TaskOwner

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

__all__ = ("PieceSink", "RangedSource")

_P = TypeVar("_P")


class PieceSink(TaskOwner, SinkBase, Generic[_P]):
    """Pieces sent in the background with a bound in flight (module docstring); the
    backend's ``_ship`` cuts the filled buffer into the next piece and starts its call,
    whose result (``_P``) lands in ``_landed`` by piece number."""

    _buffer: bytearray
    _capacity: int  # the size of the piece being filled
    _in_flight: dict[int, Call[_P]]
    _landed: dict[int, _P]

    async def _finish(self) -> None:
        await self.abort()

    async def _ship(self, group: TaskGroup) -> None:
        raise NotImplementedError

    def _harvest(self) -> None:
        """Collect finished pieces; re-raise the first failure."""
        for number, call in list(self._in_flight.items()):
            if call.done:
                del self._in_flight[number]
                self._landed[number] = call.result(url=self.url, device=self.device)

    async def _wait_in_flight(self, *, below: int) -> None:
        while len(self._in_flight) >= max(below, 1):
            await self._wait_any(self._in_flight.values())
            self._harvest()

    async def _fill(self, view: memoryview) -> None:
        """Copy ``view`` into piece buffers, shipping each one filled."""
        async with self._tasks() as group:
            done = 0
            while done < view.nbytes:
                take = min(self._capacity - len(self._buffer), view.nbytes - done)
                with view[done : done + take] as piece:
                    self._buffer += piece  # copies: the caller's buffer is not retained
                done += take
                if len(self._buffer) >= self._capacity:
                    await self._ship(group)
        self._harvest()

    async def _flush(self) -> None:
        await self._wait_in_flight(below=1)

    async def _send_rest(self, pieces: str, size: Callable[[_P], int]) -> None:
        """Ship what is buffered, wait for every piece, and refuse the commit unless
        pieces 1..n landed and hold exactly the bytes written (``pieces``: their name
        in the error)."""
        async with self._tasks() as group:
            if self._buffer:
                await self._ship(group)
            await self._wait_in_flight(below=1)
        stored = sum(size(piece) for piece in self._landed.values())
        if stored != self._size or sorted(self._landed) != list(range(1, len(self._landed) + 1)):
            raise StorageIntegrityError(
                f"commit refused: {len(self._landed)} {pieces} hold {stored} bytes, "
                f"the sink wrote {self._size}",
                url=self.url,
                device=self.device,
            )


class RangedSource(TaskOwner, SourceBase):
    """Chunked reads with read-ahead over the backend's ``_fetch`` (module docstring)."""

    def __init__(self, url: str, size: int, *, chunk_size: int) -> None:
        super().__init__(url, size)
        self._chunk_size = chunk_size
        self._chunks: dict[int, Call[bytes]] = {}

    async def _finish(self) -> None:
        await self.close()

    def _read_ahead(self) -> int:
        """How many chunks past the one being read to keep in flight."""
        raise NotImplementedError

    async def _fetch(self, index: int) -> bytes:
        """The bytes of chunk ``index`` (all of them: a short one raises)."""
        raise NotImplementedError

    async def _read_ranges(self, view: memoryview, start: int) -> int:
        sequential = start == self._position
        end = min(self._size, start + view.nbytes)
        done = 0
        async with self._tasks() as group:
            while start + done < end:
                offset = start + done
                index = offset // self._chunk_size
                chunk = await self._chunk(group, index, sequential, end)
                within = offset - index * self._chunk_size
                count = min(len(chunk) - within, view.nbytes - done)
                with memoryview(chunk) as whole, whole[within : within + count] as piece:
                    view[done : done + count] = piece
                done += count
        return done

    async def _chunk(self, group: TaskGroup, index: int, sequential: bool, end: int) -> bytes:
        """Chunk ``index``; keeps the next ``read_ahead`` in flight when sequential
        (without a group of its own: only those this read ends in, before ``end``)."""
        last = (self._size - 1) // self._chunk_size
        if self._background is None:
            last = min(last, (end - 1) // self._chunk_size)
        high = min(index + (self._read_ahead() if sequential else 0), last)
        stale = [i for i in self._chunks if i < index or i > high]
        for i in stale:
            self._chunks.pop(i).cancel()  # it ends in the group, at its next checkpoint
        for i in range(index, high + 1):
            if i not in self._chunks:
                fetch = functools.partial(self._fetch, i)
                self._chunks[i] = self._start(group, fetch, f"read of range {i}")
        call = self._chunks[index]
        await call.wait()
        try:
            return call.result(url=self.url)
        except BaseException:
            del self._chunks[index]  # a later read tries again
            raise

    async def _drop_chunks(self) -> None:
        await self._cancel(self._chunks.values())
        self._chunks.clear()
