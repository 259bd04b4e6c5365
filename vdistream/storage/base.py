"""The storage contracts: ``Sink`` (one object written), ``Source`` (one object read)
and ``Storage`` (a location holding objects by key).

Implementations live next to this module (``file``, ``memory``, ``null``); every one of
them must pass ``vdistream.testing.check_storage``. The contracts below are what the
pump, the catalog and that suite rely on, so a new backend reads them first.

Cancellation, in one place
--------------------------
Buffers handed to ``Sink.write`` and ``Source.readinto`` are ``memoryview``\\s of shared
memory that go back to the database engine the moment the call returns or raises. So a
transfer that has *started* always *finishes* before the call returns or raises: each
single write or read runs inside ``anyio.CancelScope(shield=True)``. Cancellation is
therefore delivered either before the call touches anything (the call raises the
cancellation exception and did nothing) or after it (the call returns normally and the
caller's next checkpoint raises). ``open_sink``, ``open_source``, ``flush`` and
``commit`` follow the same rule. ``abort`` (and ``Source.close``) always run to
completion, even inside a cancelled scope: half a commit or half a cleanup is worse
than a late one. Shielded calls can still take long on a slow medium, so the caller
bounds them with its own ``anyio.move_on_after`` / ``fail_after`` around the call.

Errors
------
Every failure is a ``vdistream.errors.StorageError`` subclass naming the object's URL
(and the device, when the sink was opened for one), raised ``from`` the original error.
"""

from __future__ import annotations

import abc
import builtins
from types import TracebackType
from typing import Self

from vdistream.errors import StorageExistsError, StorageNotFoundError

__all__ = ("Sink", "Source", "Storage")


class Sink(abc.ABC):
    """One object being written; nothing of it is visible until ``commit``.

    Life cycle: open -> ``write``/``flush`` any number of times -> ``commit`` (the
    object appears, complete and durable, under its key) or ``abort`` (everything this
    sink wrote is removed). One task drives a sink; calls must not overlap.

    ``async with`` a sink aborts it on exit unless it was committed, so an exception,
    a cancellation or a forgotten commit never publishes anything.

    After a ``write`` or ``flush`` *error* the sink is failed: everything but ``abort``
    raises ``StorageError``. After a *cancelled* call the sink is consistent (see the
    module docstring) and may be written, committed or aborted as usual.
    """

    #: The object's URL; appears in every error this sink raises.
    url: str
    #: The virtual device this stream belongs to, if any; named in errors.
    device: str | None

    @property
    @abc.abstractmethod
    def random_access(self) -> bool:
        """Whether ``write`` accepts ``position=``; append-only sinks refuse it."""

    @property
    @abc.abstractmethod
    def bytes_written(self) -> int:
        """Bytes accepted by completed ``write`` calls (an overwrite counts again)."""

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """The high-water mark: the size the object will have when committed."""

    @abc.abstractmethod
    async def write(self, data: memoryview, *, position: int | None = None) -> None:
        """Write all of ``data``, at the current position or at byte ``position``.

        The current position starts at 0 and is the end of the previous write, as in a
        file. ``position`` requires ``random_access`` (otherwise ``StorageError``);
        writing past ``size`` leaves zeros in between. ``data`` is not retained: once
        the call returns or raises, the caller may release or reuse the buffer.

        Cancellation: all or nothing, and ``bytes_written`` says which (shielded).
        Errors: ``StorageFullError`` when the medium is full, ``StorageError`` when the
        sink is not open or failed earlier.
        """

    @abc.abstractmethod
    async def flush(self) -> None:
        """Make everything written so far durable (fsync), without publishing it.

        Cancellation: raises before starting, or completes (shielded).
        """

    @abc.abstractmethod
    async def commit(self) -> None:
        """Publish the object atomically under its key, complete and durable.

        Verifies that the medium holds exactly ``size`` bytes (``StorageIntegrityError``
        otherwise). Never replaces an object already committed under the key: that
        raises ``StorageExistsError``, leaves the old object untouched and this sink
        sealed (its data kept), so the caller may delete the old object and call
        ``commit`` again, or ``abort``. After any other error nothing is visible under
        the key and the sink accepts only ``abort``. Committing twice is a no-op.

        Cancellation: raises before starting (the sink stays open), or completes
        (shielded): the object is either fully visible or not visible at all.
        """

    @abc.abstractmethod
    async def abort(self) -> None:
        """Remove everything this sink wrote; idempotent.

        A no-op after a successful ``commit``. Data already gone is not an error.
        Afterwards ``write``, ``flush`` and ``commit`` raise ``StorageError``.

        Cancellation: none. It runs to completion even inside an already-cancelled
        scope, which is exactly where ``__aexit__`` calls it on the way out of a
        cancelled task; the cancellation arrives at the caller's next checkpoint.
        """

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # abort() is a no-op after commit(), so calling it unconditionally aborts
        # exactly the sinks that were not committed.
        await self.abort()


class Source(abc.ABC):
    """One committed object being read from its start."""

    url: str

    @property
    @abc.abstractmethod
    def random_access(self) -> bool:
        """Whether ``readinto`` accepts ``position=``."""

    @property
    @abc.abstractmethod
    def size(self) -> int | None:
        """The object's size in bytes, or ``None`` if the backend cannot tell."""

    @abc.abstractmethod
    async def readinto(self, buffer: memoryview, *, position: int | None = None) -> int:
        """Fill ``buffer`` from the current position (or from byte ``position``).

        Returns the count of bytes read. It is less than ``len(buffer)`` only when the
        object ends, and 0 at (or past) the end. The position advances by the count.
        ``position`` requires ``random_access`` (otherwise ``StorageError``). ``buffer``
        is not retained.

        Cancellation: raises before reading anything, or completes (shielded).
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the object; idempotent. ``readinto`` then raises ``StorageError``.

        Runs to completion even inside a cancelled scope, like ``Sink.abort``.
        """

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class Storage(abc.ABC):
    """A location holding objects by key: a directory, a memory store, a bucket prefix.

    Keys are ``/``-separated relative names (``"db1/2025-01-01/dev0.bak"``): not empty,
    no empty, ``.`` or ``..`` components, no NUL; an invalid key raises
    ``StorageURLError``. Only committed objects exist for ``list``, ``stat``,
    ``open_source`` and ``delete``; data of open sinks is never seen there.
    """

    url: str

    @abc.abstractmethod
    async def open_sink(self, key: str, *, device: str | None = None) -> Sink:
        """Start writing the object ``key``; ``device`` is named in the sink's errors.

        Opening does not check whether ``key`` exists: ``commit`` does, atomically.
        Cancellation: raises before creating anything, or returns a sink that the
        caller must commit or abort (``async with`` the sink does the latter).
        """

    @abc.abstractmethod
    async def open_source(self, key: str) -> Source:
        """Open the committed object ``key`` for reading (``StorageNotFoundError``).

        Cancellation: raises before opening anything, or returns a source to close.
        """

    @abc.abstractmethod
    async def list(self, prefix: str = "") -> builtins.list[str]:
        """The committed keys starting with ``prefix`` (plain string prefix), sorted."""

    @abc.abstractmethod
    async def stat(self, key: str) -> int:
        """The size of the committed object ``key`` (``StorageNotFoundError``)."""

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Remove the committed object ``key`` (``StorageNotFoundError`` if missing).

        Cancellation: raises before starting, or completes (shielded).
        """

    async def aclose(self) -> None:
        """Release connections or clients the storage holds; the default holds none.

        Like ``Sink.abort``, runs to completion even inside a cancelled scope.
        """
        return None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def read_bytes(self, key: str) -> bytes:
        """The whole committed object ``key``; for small objects such as manifests."""
        result = bytearray()
        chunk = memoryview(bytearray(1 << 16))
        async with await self.open_source(key) as source:
            while count := await source.readinto(chunk):
                result += chunk[:count]
        return bytes(result)

    async def write_bytes(
        self,
        key: str,
        data: bytes | bytearray | memoryview,
        *,
        overwrite: bool = False,
        device: str | None = None,
    ) -> None:
        """Write and commit ``data`` as ``key`` through a sink, so it is atomic.

        An existing object raises ``StorageExistsError`` unless ``overwrite`` is set;
        then the old object is deleted and the new one committed right after, so a
        reader sees the old bytes, briefly nothing, or the new bytes, never a mix.
        """
        async with await self.open_sink(key, device=device) as sink:
            with memoryview(data) as view:
                await sink.write(view.cast("B"))
            try:
                await sink.commit()
            except StorageExistsError:
                if not overwrite:
                    raise
                try:
                    await self.delete(key)
                except StorageNotFoundError:
                    pass  # someone else removed it first; the commit below decides
                await sink.commit()
