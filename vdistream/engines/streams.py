"""Where an engine's bytes come from (backup) and go to (restore).

A backup engine reads the database image from a ``ByteProducer``; a restore engine
writes the reassembled image to a ``ByteConsumer``. Both move data through
``memoryview``\\s of the set's shared buffer area, so the contracts are about those
views:

* ``ByteProducer.readinto(view)`` fills a prefix of ``view`` and returns how many
  bytes it wrote; ``0`` means the end of the data (and only that: a producer with
  nothing ready yet waits). It may return fewer bytes than asked for; the engine asks
  again. It must not keep ``view`` after returning. ``aclose()`` releases whatever it
  holds; the engine calls it once when the job ends, successfully or not.
* ``ByteConsumer.write(view)`` takes all of ``view`` and must not keep it after
  returning (copy what must outlive the call). ``finish()`` is called once after the
  last write, when the restored image has been verified completely; ``discard()``
  instead, when the restore failed: what was written is not a valid image and should
  not be left where it could be mistaken for one.

Blocking file I/O runs in the data path's bounded pool (``vdistream.threads``), which
also means that a read or write that has started finishes even when the calling task is
cancelled: the buffer goes back to the set right after.

``as_producer`` and ``as_consumer`` turn plain values into these objects: ``bytes``
(and other buffers), a path, an async callable, an (async) iterable of byte chunks
(producer only), or an object already implementing the contract.
"""

from __future__ import annotations

import abc
import inspect
import io
import os
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import cast

import anyio
import anyio.lowlevel

from vdistream import threads

__all__ = (
    "ByteConsumer",
    "ByteProducer",
    "BytesConsumer",
    "BytesProducer",
    "CallableConsumer",
    "CallableProducer",
    "ConsumerLike",
    "FileConsumer",
    "FileProducer",
    "IterableProducer",
    "ProducerLike",
    "as_consumer",
    "as_producer",
    "partial_path",
)


class ByteProducer(abc.ABC):
    """The source of a backup's bytes (module docstring)."""

    @abc.abstractmethod
    async def readinto(self, view: memoryview) -> int:
        """Fill a prefix of ``view``; return its length, ``0`` at the end of the data."""

    async def aclose(self) -> None:  # noqa: B027 - an optional hook, not abstract
        """Release resources; called once when the job ends."""


class ByteConsumer(abc.ABC):
    """The destination of a restore's bytes (module docstring)."""

    @abc.abstractmethod
    async def write(self, view: memoryview) -> None:
        """Take all of ``view``; do not keep it after returning."""

    async def finish(self) -> None:  # noqa: B027 - an optional hook, not abstract
        """Every byte was written and the image verified."""

    async def discard(self) -> None:  # noqa: B027 - an optional hook, not abstract
        """The restore failed; drop what was written."""


# --- producers -----------------------------------------------------------------------


class BytesProducer(ByteProducer):
    """Produces the bytes of an in-memory buffer."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._data = memoryview(data).cast("B")
        self._offset = 0

    async def readinto(self, view: memoryview) -> int:
        await anyio.lowlevel.checkpoint()
        count = min(view.nbytes, self._data.nbytes - self._offset)
        view[:count] = self._data[self._offset : self._offset + count]
        self._offset += count
        return count


class FileProducer(ByteProducer):
    """Produces the bytes of a file, read in a worker thread."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._file: io.BufferedReader | None = None
        self._done = False

    async def readinto(self, view: memoryview) -> int:
        if self._done:
            return 0
        if self._file is None:
            self._file = await threads.run_sync(lambda: self.path.open("rb"))
        count = await threads.run_sync(self._file.readinto, view)
        if not count:
            self._done = True
            return 0
        return int(count)

    async def aclose(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            await threads.run_sync(file.close)


class CallableProducer(ByteProducer):
    """Adapts ``async def fill(view) -> int`` (same meaning as ``readinto``)."""

    def __init__(self, fill: Callable[[memoryview], Awaitable[int]]) -> None:
        self._fill = fill

    async def readinto(self, view: memoryview) -> int:
        count = await self._fill(view)
        if not 0 <= count <= view.nbytes:
            raise ValueError(f"producer returned {count} for a view of {view.nbytes} bytes")
        return count


class IterableProducer(ByteProducer):
    """Produces the concatenation of the chunks of an (async) iterable of buffers."""

    def __init__(self, chunks: AsyncIterable[bytes] | Iterable[bytes]) -> None:
        self._aiter: AsyncIterator[bytes] | None = None
        self._iter = None
        if isinstance(chunks, AsyncIterable):
            self._aiter = aiter(chunks)
        else:
            self._iter = iter(chunks)
        self._pending = memoryview(b"")

    async def _next_chunk(self) -> memoryview | None:
        try:
            if self._aiter is not None:
                chunk = await anext(self._aiter)
            else:
                assert self._iter is not None
                await anyio.lowlevel.checkpoint()
                chunk = next(self._iter)
        except (StopIteration, StopAsyncIteration):
            return None
        return memoryview(chunk).cast("B")

    async def readinto(self, view: memoryview) -> int:
        while not self._pending.nbytes:
            chunk = await self._next_chunk()
            if chunk is None:
                return 0
            self._pending = chunk
        count = min(view.nbytes, self._pending.nbytes)
        view[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count

    async def aclose(self) -> None:
        if self._aiter is not None:
            close = getattr(self._aiter, "aclose", None)
            if close is not None:
                await close()


# --- consumers -----------------------------------------------------------------------


class BytesConsumer(ByteConsumer):
    """Collects everything written; ``getvalue()`` returns it."""

    def __init__(self) -> None:
        self._data = bytearray()
        self.finished = False
        self.discarded = False

    async def write(self, view: memoryview) -> None:
        self._data += view  # copies: the view goes back to the set after this call

    async def finish(self) -> None:
        self.finished = True

    async def discard(self) -> None:
        self.discarded = True
        self._data.clear()

    def getvalue(self) -> bytes:
        return bytes(self._data)


def partial_path(path: Path) -> Path:
    """Where ``FileConsumer(path)`` writes until ``finish`` renames it to ``path``."""
    return path.with_name(path.name + ".partial")


class FileConsumer(ByteConsumer):
    """Writes to ``path + ".partial"`` and renames it to ``path`` on ``finish``.

    Nothing appears under ``path`` unless the whole image was written and verified;
    ``finish`` fsyncs the file, renames it and fsyncs the directory, so that the
    name survives a crash as the data does; ``discard`` removes the partial file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self._file: io.FileIO | None = None
        self._writeback: threads.Writeback | None = None
        self._written = 0

    async def _open(self) -> io.FileIO:
        if self._file is None:
            self._file = await threads.run_sync(lambda: self.partial.open("wb", buffering=0))
            # streamed to disk as it comes, so that the fsync at the end is short and a
            # large restore does not fill the page cache (threads.Writeback)
            self._writeback = threads.Writeback(self._file.fileno())
        return self._file

    async def write(self, view: memoryview) -> None:
        file = await self._open()
        await threads.run_sync(self._write_blocking, file, view)

    def _write_blocking(self, file: io.FileIO, view: memoryview) -> None:
        fd, done = file.fileno(), 0
        try:
            while done < view.nbytes:  # writes may be short
                with view[done:] as rest:
                    done += os.write(fd, rest)
            self._written += done
            assert self._writeback is not None
            self._writeback.wrote(self._written)
        except OSError as exc:  # write(2) and sync_file_range(2) name no file: we do
            if exc.filename is not None:
                raise
            raise OSError(exc.errno, exc.strerror, str(self.partial)) from exc

    async def finish(self) -> None:
        file = await self._open()  # an empty image still yields an (empty) file
        writeback = self._writeback

        def seal() -> None:
            try:
                os.fsync(file.fileno())
                if writeback is not None:
                    writeback.finish()
            finally:
                file.close()
            os.replace(self.partial, self.path)
            threads.fsync_directory(self.path.parent)  # the new name must survive a crash too

        # The file stays ours until the call ran: cancelled while waiting for a
        # thread, finish did nothing and discard still closes and removes it.
        await threads.run_sync(seal)
        self._file = self._writeback = None

    async def discard(self) -> None:
        file, self._file, self._writeback = self._file, None, None

        def drop() -> None:
            if file is not None:
                file.close()
            self.partial.unlink(missing_ok=True)

        with anyio.CancelScope(shield=True):  # cleanup runs to the end
            await threads.run_sync(drop)


class CallableConsumer(ByteConsumer):
    """Adapts ``async def write(view) -> None``."""

    def __init__(self, write: Callable[[memoryview], Awaitable[object]]) -> None:
        self._write = write

    async def write(self, view: memoryview) -> None:
        await self._write(view)


# --- coercion ------------------------------------------------------------------------

ProducerLike = (
    ByteProducer
    | bytes
    | bytearray
    | memoryview
    | str
    | os.PathLike[str]
    | Callable[[memoryview], Awaitable[int]]
    | AsyncIterable[bytes]
    | Iterable[bytes]
)
ConsumerLike = ByteConsumer | str | os.PathLike[str] | Callable[[memoryview], Awaitable[object]]


def as_producer(source: ProducerLike) -> ByteProducer:
    """A ``ByteProducer`` for ``source`` (see the module docstring for what is accepted)."""
    if isinstance(source, ByteProducer):
        return source
    if isinstance(source, bytes | bytearray | memoryview):
        return BytesProducer(source)
    if isinstance(source, str | os.PathLike):
        return FileProducer(source)
    if callable(source) and inspect.iscoroutinefunction(source):
        return CallableProducer(source)
    if isinstance(source, AsyncIterable | Iterable):
        return IterableProducer(cast("AsyncIterable[bytes] | Iterable[bytes]", source))
    if callable(source):
        return CallableProducer(source)
    raise TypeError(f"cannot produce bytes from {type(source).__name__}")


def as_consumer(target: ConsumerLike) -> ByteConsumer:
    """A ``ByteConsumer`` for ``target``: a consumer, a path or an async callable."""
    if isinstance(target, ByteConsumer):
        return target
    if isinstance(target, str | os.PathLike):
        return FileConsumer(target)
    if callable(target):
        return CallableConsumer(target)
    raise TypeError(f"cannot consume bytes with {type(target).__name__}")
