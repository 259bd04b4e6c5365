"""One backup written to two destinations in one pass (``--mirror``, SQL Server's
``MIRROR TO``).

``MirrorStorage(primary, secondary)`` is a ``Storage`` whose sinks write every buffer
to a sink of each destination: the engine produces each stream once, the pipeline's
stages (hash, compression, encryption) run once above the ``MirrorSink``, and only the
stored bytes are teed. The rule is all or nothing across both:

* ``write`` and ``flush`` go to both sinks at once (two tasks, each call shielded as
  the ``Sink`` contract says), with the *same* ``memoryview``: no copy is made, and
  both writes have finished with the buffer before the call returns or raises. Two
  local directories therefore write in parallel worker threads. An error of either
  fails the mirror sink (the pump then aborts the job: both sides are aborted).
  ``blocking_writes`` is false even over two file sinks, on purpose: the stored-hash
  stage above then hashes in one worker thread while the two sides write in two
  others; a fused one-thread call (``write_blocking``) would write the sides one
  after the other (measured: the same CPU time, and no faster).
* ``commit`` commits both at once. The mirror sink is committed only when both are;
  if one side committed and the other failed, the committed object is deleted again
  (what cannot be deleted is reported as ``OrphanUploadsError``, naming it and the
  command that removes it). When *both* refuse because the key exists
  (``StorageExistsError``), the sink stays sealed and ``commit`` may be retried, as
  the contract says; when only one side refuses, the other side's new object is
  deleted again and the sink fails with a plain ``StorageError`` (the destinations
  disagree: a retry could not be made atomic, so it is not the retryable refusal).
* ``abort`` aborts both, and deletes what one side had already published.

Everything else of the storage goes to both where it writes or marks (``delete``,
``in_progress``, ``sweep``, ``probe``, ``background``, ``aclose``) and to the primary
where it reads (``open_source``, ``list``, ``stat``): a mirrored backup is restored and
verified from either destination alone, each opened by its own URL, never through a
``MirrorStorage``. ``replace_bytes`` keeps the default refusal: two objects cannot be
replaced as one atomically (``vdistream key rotate`` rewraps each destination's
manifests by that destination's own URL). ``url`` is the primary's, so device URLs
and errors of the job name the primary; errors of a sink name the side that failed.

The manifests are not this module's business: ``vdistream.operations`` writes one to
each destination (each with its own device URLs), after both sides committed every
stream, and removes both and every stream when either cannot be written.
"""

from __future__ import annotations

import builtins
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

import anyio
import anyio.lowlevel

from vdistream.errors import StorageError, StorageExistsError, StorageNotFoundError
from vdistream.log import get_logger
from vdistream.storage._common import byte_view, check_position
from vdistream.storage.base import (
    OrphanUploadsError,
    Sink,
    SinkState,
    Source,
    Storage,
)

__all__ = ("MirrorSink", "MirrorStorage")

_log = get_logger(__name__)
_T = TypeVar("_T")


async def _on_both(
    call: Callable[[_T], Awaitable[object]], items: Sequence[_T]
) -> list[BaseException]:
    """``call(item)`` for every item at once; the exceptions raised, in item order.

    Every call runs to its end whatever the others do (no call is cancelled because
    another failed: each may hold the caller's buffer), and nothing comes out as an
    exception group. The caller shields this when the calls must not be cancelled.
    """
    failed: dict[int, BaseException] = {}

    async def one(index: int, item: _T) -> None:
        try:
            await call(item)
        except Exception as exc:
            failed[index] = exc

    async with anyio.create_task_group() as tg:
        # The last item runs in this task: one task fewer to start per buffer.
        for index, item in enumerate(items[:-1]):
            tg.start_soon(one, index, item)
        await one(len(items) - 1, items[-1])
    return [failed[i] for i in sorted(failed)]


def _combined(errors: Sequence[BaseException]) -> BaseException:
    """One exception for the errors of both sides: the first, its line naming the
    second too (the user sees one line, never a group)."""
    first = errors[0]
    if len(errors) > 1:
        first.args = (f"{first}; and {errors[1]}",)
    return first


class MirrorSink(Sink):
    """Writes one object to both destinations of a ``MirrorStorage`` (module doc)."""

    def __init__(
        self, storages: tuple[Storage, Storage], key: str, sinks: tuple[Sink, Sink]
    ) -> None:
        self._storages = storages
        self._key = key
        self._sinks = sinks
        self.url = sinks[0].url
        self.device = sinks[0].device
        self._state = SinkState.OPEN
        #: which sides published the object (their sink committed)
        self._published: set[int] = set()

    def __repr__(self) -> str:
        return f"<MirrorSink {self._sinks[0].url} + {self._sinks[1].url} {self._state.value}>"

    @property
    def sinks(self) -> tuple[Sink, Sink]:
        """The primary's and the secondary's sink."""
        return self._sinks

    @property
    def state(self) -> SinkState:
        return self._state

    @property
    def random_access(self) -> bool:
        return all(sink.random_access for sink in self._sinks)

    @property
    def bytes_written(self) -> int:
        return self._sinks[0].bytes_written

    @property
    def size(self) -> int:
        return self._sinks[0].size

    def _require(self, *allowed: SinkState, what: str) -> None:
        if self._state not in allowed:
            raise StorageError(
                f"cannot {what}: the sink is {self._state.value}", url=self.url, device=self.device
            )

    async def write(self, data: memoryview, *, position: int | None = None) -> None:
        self._require(SinkState.OPEN, what="write")
        check_position(position, random_access=self.random_access, url=self.url, device=self.device)
        view = byte_view(data)
        await anyio.lowlevel.checkpoint_if_cancelled()
        # Shielded: both sides read the caller's buffer until both are done with it.
        with anyio.CancelScope(shield=True):
            errors = await _on_both(lambda sink: sink.write(view, position=position), self._sinks)
        if errors:
            self._state = SinkState.FAILED
            raise _combined(errors)

    async def flush(self) -> None:
        self._require(SinkState.OPEN, what="flush")
        await anyio.lowlevel.checkpoint_if_cancelled()
        with anyio.CancelScope(shield=True):
            errors = await _on_both(lambda sink: sink.flush(), self._sinks)
        if errors:
            self._state = SinkState.FAILED
            raise _combined(errors)

    async def commit(self) -> None:
        if self._state is SinkState.COMMITTED:
            return
        self._require(SinkState.OPEN, SinkState.SEALED, what="commit")
        await anyio.lowlevel.checkpoint_if_cancelled()
        with anyio.CancelScope(shield=True):
            failed: dict[int, BaseException] = {}

            async def commit(index: int) -> None:
                try:
                    await self._sinks[index].commit()
                except Exception as exc:
                    failed[index] = exc
                else:
                    self._published.add(index)

            await _on_both(commit, (0, 1))
            if not failed:
                self._state = SinkState.COMMITTED
                return
            errors = [failed[i] for i in sorted(failed)]
            if len(errors) == 2 and all(isinstance(e, StorageExistsError) for e in errors):
                self._state = SinkState.SEALED  # both kept their data: commit may be retried
                raise errors[0]
            # One side failed (or only one found the key taken): take back what the
            # other published, so that neither destination shows the object.
            self._state = SinkState.FAILED
            left = await self._unpublish()
            if left:
                raise self._orphans(left, str(errors[0])) from errors[0]
            if all(isinstance(e, StorageExistsError) for e in errors):
                # Only one side has the key: not the retryable StorageExistsError (the
                # sink is failed, and a caller that deleted "the old object" and
                # committed again would have lost it for nothing).
                taken = errors[0]
                where = taken.url if isinstance(taken, StorageError) else None
                raise StorageError(
                    f"{self._key} exists in only one destination "
                    f"({where or 'unknown'}): the destinations disagree",
                    url=self.url,
                    device=self.device,
                ) from taken
            # the other side's own error first: never the retryable type from a failed sink
            errors.sort(key=lambda error: isinstance(error, StorageExistsError))
            raise _combined(errors)

    async def abort(self) -> None:
        if self._state in (SinkState.COMMITTED, SinkState.ABORTED):
            return
        # No checkpoint: abort runs to completion even in a cancelled scope.
        with anyio.CancelScope(shield=True):
            errors = await _on_both(lambda sink: sink.abort(), self._sinks)
            left = await self._unpublish()
        if left:
            errors.append(self._orphans(left, "the delete was refused"))
        if errors:
            # What is left first: the job reports leftovers by this type (and the line
            # still names the other side's error).
            errors.sort(key=lambda error: not isinstance(error, OrphanUploadsError))
            raise _combined(errors)
        self._state = SinkState.ABORTED

    async def _unpublish(self) -> list[tuple[Storage, BaseException]]:
        """Delete the object from the sides that published it; the failures."""
        left: list[tuple[Storage, BaseException]] = []
        for index in sorted(self._published):
            storage = self._storages[index]
            try:
                await storage.delete(self._key)
            except StorageNotFoundError:
                pass  # gone already
            except StorageError as exc:
                _log.error("mirror_unpublish_failed", url=self._sinks[index].url, error=str(exc))
                left.append((storage, exc))
                continue
            self._published.discard(index)
        return left

    def _orphans(self, left: list[tuple[Storage, BaseException]], reason: str) -> StorageError:
        storage, _ = left[0]
        return OrphanUploadsError(storage.url, [f"object {self._key}"], reason)


class MirrorStorage(Storage):
    """Two destinations written as one (see the module docstring).

    ``primary`` and ``secondary`` are the caller's: ``aclose`` closes both, but a
    caller that opened them (``operations.opened_storage``) usually closes them itself
    and never calls it.
    """

    def __init__(self, primary: Storage, secondary: Storage) -> None:
        self.primary = primary
        self.secondary = secondary
        self.url = primary.url

    def __repr__(self) -> str:
        return f"<MirrorStorage {self.primary.url} + {self.secondary.url}>"

    @property
    def storages(self) -> tuple[Storage, Storage]:
        """The primary and the secondary, in that order."""
        return (self.primary, self.secondary)

    async def open_sink(self, key: str, *, device: str | None = None) -> MirrorSink:
        await anyio.lowlevel.checkpoint_if_cancelled()
        # Shielded so that a cancellation cannot lose the first sink while the second opens.
        with anyio.CancelScope(shield=True):
            first = await self.primary.open_sink(key, device=device)
            try:
                second = await self.secondary.open_sink(key, device=device)
            except BaseException:
                await first.abort()
                raise
        return MirrorSink(self.storages, key, (first, second))

    async def open_source(self, key: str) -> Source:
        """The primary's object (a restore opens one destination by its own URL)."""
        return await self.primary.open_source(key)

    async def list(self, prefix: str = "") -> builtins.list[str]:
        """The primary's keys."""
        return await self.primary.list(prefix)

    async def stat(self, key: str) -> int:
        """The size of the primary's object."""
        return await self.primary.stat(key)

    async def delete(self, key: str) -> None:
        """Delete ``key`` on both sides; ``StorageNotFoundError`` only when neither had
        it; any other failure is raised after both were tried."""
        await anyio.lowlevel.checkpoint_if_cancelled()
        with anyio.CancelScope(shield=True):
            errors = await _on_both(lambda storage: storage.delete(key), self.storages)
        missing = [e for e in errors if isinstance(e, StorageNotFoundError)]
        others = [e for e in errors if not isinstance(e, StorageNotFoundError)]
        if others:
            raise _combined(others)
        if len(missing) == 2:
            raise missing[0]

    @contextlib.asynccontextmanager
    async def in_progress(self, backup_id: str) -> AsyncIterator[None]:
        """Both destinations' marks, for as long as the block lasts."""
        async with self.primary.in_progress(backup_id), self.secondary.in_progress(backup_id):
            yield

    async def sweep(self) -> builtins.list[str]:
        """Both sweeps; what each removed (keys relative to their own storage)."""
        return [*await self.primary.sweep(), *await self.secondary.sweep()]

    async def probe(self) -> None:
        """Both probes at once; the first failure (each names its own URL)."""
        errors = await _on_both(lambda storage: storage.probe(), self.storages)
        if errors:
            raise errors[0]

    @contextlib.asynccontextmanager
    async def background(self) -> AsyncIterator[None]:
        async with self.primary.background(), self.secondary.background():
            yield

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            errors = await _on_both(lambda storage: storage.aclose(), self.storages)
        if errors:
            raise errors[0]
