"""The storage contracts: ``Sink`` (one object written), ``Source`` (one object read)
and ``Storage`` (a location holding objects by key).

Implementations live next to this module (``file``, ``memory``, ``null``, ``s3``); every
one of them must pass ``vdistream.testing.check_storage``. The contracts below are what
the pump, the catalog and that suite rely on, so a new backend reads them first, then
builds on ``SinkBase`` and ``SourceBase``, which implement the rules below once.

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
Three of them are defined here, for the debris contracts of ``Storage``:
``BackupInProgressError`` (``in_progress``), ``OrphanUploadsError`` (an abort the store
refused: names what is left and the command that removes it) and ``StorageProbeError``
(``probe``). Their messages are one line in the user's terms.

Debris, in one place
--------------------
A backup writes several objects before its manifest makes them a backup. If its process
dies (``kill -9``, a power cut), what it wrote is debris. ``Storage.in_progress``
marks a backup as owned by a live process for its whole life, in a way that outlives
the process only as *proof of its death* (a released ``flock`` on file storage, an owner
record whose pid is gone on object storage); ``Storage.sweep`` removes the debris of
backups whose owner is provably gone, and never anything of a live owner, on this host
or another one. What cannot be proven stays for ``vdistream storage audit --clean``.
"""

from __future__ import annotations

import abc
import builtins
import contextlib
import enum
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import ClassVar, Self

import anyio
import anyio.lowlevel

from vdistream.errors import StorageError, StorageExistsError, StorageNotFoundError
from vdistream.storage._common import byte_view, check_backup_id, check_position

__all__ = (
    "BackupInProgressError",
    "OrphanUploadsError",
    "Sink",
    "SinkBase",
    "SinkState",
    "Source",
    "SourceBase",
    "Storage",
    "StorageProbeError",
    "byte_view",
)


class SinkState(enum.Enum):
    """Where a sink is in its life; see ``Sink`` for the transitions."""

    OPEN = "open"
    #: the data is final (a stage wrote its trailer), nothing is published yet: commit
    #: was refused (the key exists) and may be called again
    SEALED = "sealed"
    COMMITTED = "committed"
    ABORTED = "aborted"
    #: an I/O error happened: only abort() is still allowed
    FAILED = "failed"


class BackupInProgressError(StorageError):
    """``in_progress``: another live process is writing this backup."""


class StorageProbeError(StorageError):
    """``probe``: the destination is not reachable or not writable.

    The message is the storage's URL and the reason, ``"s3://b/p: no such bucket"``;
    ``url`` is the storage's URL.
    """

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{url}: {reason}")
        self.url = url


class OrphanUploadsError(StorageError):
    """What a job wrote could not be removed (the store refused the abort or delete).

    One line that names what is left and the command that removes it::

        the store refused to remove what the job wrote (S3 AccessDenied ...): left in
        s3://b/p: upload db/s1 7f3a...; run `vdistream storage audit --clean s3://b/p`
        to remove it

    ``leftovers`` holds ``"upload KEY ID"`` / ``"object KEY"`` strings (keys relative
    to the storage), ``storage_url`` the storage's URL (what the command needs).
    ``merge`` collapses several into one (a job with many devices), so the user sees one
    line, never an exception group.
    """

    def __init__(self, storage_url: str, leftovers: Iterable[str], reason: str = "") -> None:
        self.storage_url = storage_url
        self.leftovers = tuple(leftovers)
        self.reason = reason
        shown = ", ".join(self.leftovers[:5]) + (", ..." if len(self.leftovers) > 5 else "")
        because = f" ({reason})" if reason else ""
        them = "them" if len(self.leftovers) != 1 else "it"
        super().__init__(
            f"the store refused to remove what the job wrote{because}: left in "
            f"{storage_url}: {shown or 'unknown'}; run `vdistream storage audit --clean "
            f"{storage_url}` to remove {them}"
        )
        self.url = storage_url

    @classmethod
    def merge(cls, errors: Iterable[OrphanUploadsError]) -> OrphanUploadsError:
        """One error for many (the first's storage and reason)."""
        found = builtins.list(errors)
        if not found:
            raise ValueError("nothing to merge")
        leftovers = dict.fromkeys(item for error in found for item in error.leftovers)
        return cls(found[0].storage_url, leftovers, found[0].reason)


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

    @property
    def blocking_writes(self) -> bool:
        """Whether ``write_blocking`` may be used: the whole of a ``write`` is plain
        blocking work (a file write, a hash, a cipher) that a worker thread can do in
        one call. False by default (S3 and other sinks that need the event loop)."""
        return False

    def write_blocking(self, data: memoryview, *, position: int | None = None) -> None:
        """``write`` as one blocking call, only when ``blocking_writes`` is true.

        For the task that drives this sink, which calls it from one worker thread of
        ``vdistream.threads`` and awaits that thread (so calls still never overlap, and
        the thread call is what is shielded: it finishes once started). Same results,
        errors and states as ``write``; no cancellation inside. This is how a device's
        whole per-byte work (hash, compress, encrypt, hash, write) becomes one worker
        thread call per buffer instead of one thread hop per stage.
        """
        raise NotImplementedError(f"{type(self).__name__} has no blocking writes")

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

    async def __aexit__(self, *exc_info: object) -> None:
        # abort() is a no-op after commit(): this aborts exactly the uncommitted sinks.
        await self.abort()


class SinkBase(Sink):
    """The skeleton of every sink: one ``SinkState``, the guards, the byte counters and
    the templates of ``write``, ``flush``, ``commit`` and ``abort`` that carry the
    cancellation rules of the module docstring. A subclass supplies only its steps:

    * ``_write(view, start)``: store all of ``view`` (flat bytes) at byte ``start``;
    * ``_flush()``: make what was written durable (default: nothing to do);
    * ``_seal()``: make the data final before publishing (default: nothing to do);
    * ``_publish()``: make the object visible; raising ``StorageExistsError`` keeps the
      sink sealed (commit may be retried), any other error fails it;
    * ``_discard()``: remove what was written; runs shielded, even when cancelled;
    * ``_write_blocking(view, start)`` (with ``BLOCKING_WRITES = True``): ``_write`` as
      plain blocking code, for ``write_blocking`` (``Sink.blocking_writes``);
    * ``_errors(what)``: a context translating the medium's own errors (default: none).

    Every step but ``_discard`` runs shielded, after the checkpoint, inside
    ``_failing``: any error leaves the sink ``FAILED`` (only ``abort`` remains).
    ``random_access`` is a class attribute; ``_check_position`` and ``_refusal`` may be
    overridden for other rules and other errors (the pipeline's stages do).
    """

    random_access: bool = True
    #: the subclass implements ``_write_blocking`` (see ``Sink.blocking_writes``)
    BLOCKING_WRITES: ClassVar[bool] = False

    def __init__(self, url: str, device: str | None = None) -> None:
        self.url = url
        self.device = device
        self._state = SinkState.OPEN
        self._position = 0  # the end of the last write
        self._size = 0
        self._written = 0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url} {self._state.value}, {self._size} bytes>"

    @property
    def bytes_written(self) -> int:
        return self._written

    @property
    def size(self) -> int:
        return self._size

    @property
    def blocking_writes(self) -> bool:
        return self.BLOCKING_WRITES

    def require(self, *allowed: SinkState, what: str) -> None:
        """Refuse ``what`` unless the sink is in one of the ``allowed`` states."""
        if self._state not in allowed:
            raise self._refusal(what)

    def _refusal(self, what: str) -> Exception:
        return StorageError(
            f"cannot {what}: the sink is {self._state.value}", url=self.url, device=self.device
        )

    def _check_position(self, position: int | None) -> None:
        check_position(position, random_access=self.random_access, url=self.url, device=self.device)

    def _errors(self, what: str) -> contextlib.AbstractContextManager[object]:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _failing(self, what: str) -> Iterator[None]:
        """Translate errors (``_errors``); any error leaves the sink failed."""
        try:
            with self._errors(what):
                yield
        except BaseException:
            self._state = SinkState.FAILED
            raise

    async def write(self, data: memoryview, *, position: int | None = None) -> None:
        self.require(SinkState.OPEN, what="write")
        self._check_position(position)
        view = byte_view(data)
        await anyio.lowlevel.checkpoint_if_cancelled()
        start = self._position if position is None else position
        # Shielded: the engine reuses the buffer as soon as we return, so a write that
        # has started must not be abandoned half-way (in a worker thread, say).
        with anyio.CancelScope(shield=True), self._failing("write"):
            await self._write(view, start)
        self._position = start + view.nbytes
        if view.nbytes:
            self._size = max(self._size, self._position)
        self._written += view.nbytes

    def write_blocking(self, data: memoryview, *, position: int | None = None) -> None:
        if not self.blocking_writes:
            super().write_blocking(data, position=position)
        self.require(SinkState.OPEN, what="write")
        self._check_position(position)
        view = byte_view(data)
        start = self._position if position is None else position
        with self._failing("write"):
            self._write_blocking(view, start)
        self._position = start + view.nbytes
        if view.nbytes:
            self._size = max(self._size, self._position)
        self._written += view.nbytes

    def _write_blocking(self, view: memoryview, start: int) -> None:
        raise NotImplementedError

    async def flush(self) -> None:
        self.require(SinkState.OPEN, what="flush")
        await anyio.lowlevel.checkpoint_if_cancelled()
        with anyio.CancelScope(shield=True), self._failing("flush"):
            await self._flush()

    async def commit(self) -> None:
        if self._state is SinkState.COMMITTED:
            return
        self.require(SinkState.OPEN, SinkState.SEALED, what="commit")
        await anyio.lowlevel.checkpoint_if_cancelled()
        with anyio.CancelScope(shield=True):
            if self._state is SinkState.OPEN:
                with self._failing("commit"):
                    await self._seal()
                self._state = SinkState.SEALED
            try:
                with self._errors("commit"):
                    await self._publish()
            except StorageExistsError:
                raise  # the old object is untouched; sealed, so commit may be retried
            except BaseException:
                self._state = SinkState.FAILED
                raise
            self._state = SinkState.COMMITTED

    async def abort(self) -> None:
        if self._state in (SinkState.COMMITTED, SinkState.ABORTED):
            return
        # No checkpoint first: abort runs even in an already-cancelled scope (it is
        # what __aexit__ calls on the way out of one).
        with anyio.CancelScope(shield=True), self._errors("abort"):
            await self._discard()
        self._state = SinkState.ABORTED

    @abc.abstractmethod
    async def _write(self, view: memoryview, start: int) -> None: ...

    async def _flush(self) -> None:
        return None

    async def _seal(self) -> None:
        return None

    @abc.abstractmethod
    async def _publish(self) -> None: ...

    @abc.abstractmethod
    async def _discard(self) -> None: ...


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

    @property
    def blocking_reads(self) -> bool:
        """Whether ``readinto_blocking`` may be used (``Sink.blocking_writes``' twin)."""
        return False

    def readinto_blocking(self, buffer: memoryview, *, position: int | None = None) -> int:
        """``readinto`` as one blocking call, only when ``blocking_reads`` is true; for
        the task reading this source, from one worker thread it awaits (see
        ``Sink.write_blocking``)."""
        raise NotImplementedError(f"{type(self).__name__} has no blocking reads")

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the object; idempotent. ``readinto`` then raises ``StorageError``.

        Runs to completion even inside a cancelled scope, like ``Sink.abort``.
        """

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class SourceBase(Source):
    """The skeleton of a random-access source of known ``size``: the closed flag, the
    position and the templates of ``readinto`` and ``close`` that carry the
    cancellation rules. A subclass implements ``_readinto(view, start)`` (fill ``view``
    from byte ``start``, fewer bytes only at the end of the object; runs shielded) and
    ``_close()`` (runs once, shielded). With ``BLOCKING_READS = True`` it also
    implements ``_readinto_blocking(view, start)``, the same as plain blocking code.
    """

    random_access: bool = True
    BLOCKING_READS: ClassVar[bool] = False

    def __init__(self, url: str, size: int) -> None:
        self.url = url
        self._size = size
        self._position = 0
        self._closed = False

    @property
    def size(self) -> int:
        return self._size

    async def readinto(self, buffer: memoryview, *, position: int | None = None) -> int:
        if self._closed:
            raise StorageError("cannot read: the source is closed", url=self.url)
        check_position(position, random_access=self.random_access, url=self.url)
        view = byte_view(buffer)
        await anyio.lowlevel.checkpoint_if_cancelled()
        start = self._position if position is None else position
        # Shielded for the same reason as SinkBase.write: the buffer is shared memory.
        with anyio.CancelScope(shield=True):
            done = await self._readinto(view, start)
        self._position = start + done
        return done

    @property
    def blocking_reads(self) -> bool:
        return self.BLOCKING_READS

    def readinto_blocking(self, buffer: memoryview, *, position: int | None = None) -> int:
        if not self.blocking_reads:
            return super().readinto_blocking(buffer, position=position)
        if self._closed:
            raise StorageError("cannot read: the source is closed", url=self.url)
        check_position(position, random_access=self.random_access, url=self.url)
        view = byte_view(buffer)
        start = self._position if position is None else position
        done = self._readinto_blocking(view, start)
        self._position = start + done
        return done

    def _readinto_blocking(self, view: memoryview, start: int) -> int:
        raise NotImplementedError

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            with anyio.CancelScope(shield=True):
                await self._close()

    @abc.abstractmethod
    async def _readinto(self, view: memoryview, start: int) -> int: ...

    async def _close(self) -> None:
        return None


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

    def in_progress(self, backup_id: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Mark the backup ``backup_id`` (the objects under ``<backup_id>/``) as being
        written by this process, for as long as the context is held.

        Hold it for the backup's whole life: from before the first sink opens until
        after the manifest is committed, or the streams of a failed backup removed. On
        exit the mark is removed (also on error and cancellation; exit runs shielded).
        If another live process holds the mark, entering raises
        ``BackupInProgressError`` ("backup ID is being written by another process
        (host, pid N)"). The mark is what ``sweep`` uses to prove that a backup's
        owner is gone. The default is a no-op (memory and null storages die with their
        process: nothing to sweep). Entering may create ``<backup_id>/`` (file storage).
        An id that cannot name a directory of keys raises ``StorageURLError`` at once.
        """
        check_backup_id(backup_id, url=self.url)
        return _no_mark()

    async def sweep(self) -> builtins.list[str]:
        """Remove the debris of backups whose owner is provably gone; return what went.

        Debris: streams of a backup without a committed manifest, sink temporaries,
        stale marks, in-progress multipart uploads under such a backup's keys. Each
        item removed is logged (structlog event ``debris_removed``) and returned as a
        key relative to the storage, or ``"upload KEY ID"``. Never touches a backup
        whose owner lives (here or, where that cannot be told, on another host), nor a
        backup with a committed manifest (only its stray temporaries and stale mark),
        nor anything without a mark (debris of older versions): that is left to
        ``vdistream storage audit --clean --min-age``. Removal failures are logged and
        skipped (the next sweep tries again); the default sweeps nothing.
        """
        return []

    async def probe(self) -> None:
        """Check that the destination is reachable and writable, before a job starts.

        Creates (if needed) what a backup would create, writes a small probe object and
        removes it again; raises ``StorageProbeError`` naming the URL and the reason in
        the user's terms (``"s3://b/p: no such bucket"``, ``"/dir: permission
        denied"``). The default (memory, null) has nothing to check.
        """
        return None

    @contextlib.asynccontextmanager
    async def background(self) -> AsyncIterator[None]:
        """Where the storage's sinks and sources may keep work going between their calls
        (S3: part uploads, read-ahead), for as long as the block lasts; the default keeps
        none. A job enters it for its whole life (``coordinator.opened_storage``), so that
        this work belongs to a task group that outlives every device; a sink or source
        opened outside it waits, in each call, for everything that call started.
        """
        yield

    async def aclose(self) -> None:
        """Release connections or clients the storage holds; the default holds none.

        Like ``Sink.abort``, runs to completion even inside a cancelled scope.
        """
        return None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def read_bytes(self, key: str) -> bytes:
        """The whole committed object ``key``; for small objects such as manifests."""
        result = bytearray()
        chunk = memoryview(bytearray(1 << 16))
        async with await self.open_source(key) as source:
            while count := await source.readinto(chunk):
                result += chunk[:count]
        return bytes(result)

    async def replace_bytes(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """Replace the committed object ``key`` with ``data`` atomically: a reader sees
        the old bytes or the new bytes, never nothing and never a mix, and the old bytes
        stay until the new ones are durable. For small objects (a manifest rewrapped by
        ``vdistream key rotate``). ``StorageNotFoundError`` when ``key`` does not exist.

        The default refuses (``StorageError``): only a backend that can keep that promise
        overrides it (``write_bytes(overwrite=True)`` cannot: it deletes first).
        """
        await anyio.lowlevel.checkpoint()
        raise StorageError("this storage cannot replace an object atomically", url=self.url)

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


@contextlib.asynccontextmanager
async def _no_mark() -> AsyncIterator[None]:
    yield
