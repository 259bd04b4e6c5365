"""The two shapes of a transforming stage (compression, encryption).

``StageSink`` is a ``SinkBase`` that transforms what is written and writes the result
to ``inner``; ``StageSource`` reads ``inner`` and hands out what its transform made of
it, from one output buffer it refills. Both follow the cancellation rule of
``vdistream.storage.base``: one checkpoint on entry, then the whole transfer shielded,
because a compressor or cipher that consumed part of a buffer cannot be rolled back.
Both are sequential: a ``position=`` other than the current one raises
``PipelineError``, and their own errors are ``PipelineError``\\s naming the stream.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator
from typing import ClassVar

import anyio
import anyio.lowlevel

from vdistream import threads
from vdistream.errors import PipelineError
from vdistream.storage import Sink, SinkBase, SinkState, Source, byte_view

__all__ = ("StageSink", "StageSource", "check_sequential", "read_full", "where")

_REFUSALS = {
    SinkState.SEALED: "the stream was already finished by commit",
    SinkState.COMMITTED: "the stream is committed",
    SinkState.ABORTED: "the stream was aborted",
    SinkState.FAILED: "an earlier write, flush or commit failed",
}


def where(url: str, device: str | None = None) -> str:
    """The ``(device 'x', url)`` suffix every stage error ends with."""
    return f"(device {device!r}, {url})" if device is not None else f"({url})"


def check_sequential(
    position: int | None, current: int, *, stage: str, url: str, device: str | None = None
) -> None:
    """Refuse a ``position=`` other than the current one: a stream cannot seek."""
    if position is not None and position != current:
        raise PipelineError(
            f"cannot access byte {position}: a {stage} stream is sequential and its next "
            f"byte is {current} {where(url, device)}"
        )


async def read_full(source: Source, view: memoryview) -> int:
    """Fill ``view`` from ``source``; fewer bytes only at the end of the object."""
    done = 0
    while done < view.nbytes:
        with view[done:] as rest:
            count = await source.readinto(rest)
        if not count:
            break
        done += count
    return done


class StageSink(SinkBase):
    """Transforms the bytes written; ``_publish`` commits ``inner`` (a refused commit
    leaves the stage sealed, so ``commit`` again retries only that), ``_discard``
    aborts it and calls ``_release`` to drop the transform's state.

    ``size`` and ``bytes_written`` count the bytes given to the stage. CPU steps run in
    ``vdistream.threads`` through ``limiter``. Only one thread uses the transform at a
    time: calls never overlap and every thread call is awaited before the next starts.

    A subclass that implements ``_write_blocking`` (transform and hand the result to
    ``inner.write_blocking``) sets ``BLOCKING_WRITES``; the stage then has blocking
    writes whenever ``inner`` has them, and its ``_write`` is one thread call doing all
    of it (``_write_through``).
    """

    random_access = False
    #: "compressed", "encrypted": names the stream in errors
    STAGE: ClassVar[str]

    def __init__(self, inner: Sink, limiter: anyio.CapacityLimiter | None) -> None:
        super().__init__(inner.url, inner.device)
        self.inner = inner
        self.limiter = limiter

    @property
    def blocking_writes(self) -> bool:
        return self.BLOCKING_WRITES and self.inner.blocking_writes

    async def _write_through(self, view: memoryview, start: int) -> None:
        """``_write_blocking`` in one worker-thread call (the caller checked
        ``blocking_writes``)."""
        await threads.run_sync(self._write_blocking, view, start, limiter=self.limiter)

    def _refusal(self, what: str) -> Exception:
        reason = _REFUSALS.get(self._state, f"the stream is {self._state.value}")
        return PipelineError(f"cannot {what}: {reason} {where(self.url, self.device)}")

    def _check_position(self, position: int | None) -> None:
        check_sequential(position, self._size, stage=self.STAGE, url=self.url, device=self.device)

    async def _publish(self) -> None:
        await self.inner.commit()

    async def _discard(self) -> None:
        await self.inner.abort()
        self._release()

    @abc.abstractmethod
    def _release(self) -> None:
        """Drop the transform and its buffers (the stream is finished or aborted)."""


class StageSource(Source):
    """Hands out ``_out[_out_start:_out_end]``, calling ``_refill`` when it is empty,
    until ``_ended``. A subclass implements ``_refill`` (refill ``_out`` and set the
    bounds, or set ``_ended`` at the clean end of the stream) and may override
    ``_start`` (run before the first byte, e.g. reading a header).

    A ``PipelineError`` is remembered: every later call raises it again, and bytes
    copied into the caller's buffer during the failing call are not delivered (the
    caller gets the exception, never a short count that would look like a clean end).
    ``size`` is None: unknown until the end.
    """

    random_access = False
    size = None
    STAGE: ClassVar[str]

    def __init__(self, inner: Source, limiter: anyio.CapacityLimiter | None) -> None:
        self.inner = inner
        self.limiter = limiter
        self.url = inner.url
        self._out = bytearray()
        self._out_start = self._out_end = 0
        self._ended = False
        self._position = 0
        self._error: PipelineError | None = None

    @property
    def bytes_read(self) -> int:
        """Transformed bytes handed out so far."""
        return self._position

    def _raise_latched(self) -> None:
        if self._error is not None:
            raise type(self._error)(str(self._error))

    @contextlib.contextmanager
    def _latching(self) -> Iterator[None]:
        """Remember a stream error: every later call raises it again."""
        try:
            yield
        except PipelineError as exc:
            self._error = exc
            self._out_start = self._out_end = 0
            raise

    async def _start(self) -> object:
        return None

    @abc.abstractmethod
    async def _refill(self) -> None: ...

    async def readinto(self, buffer: memoryview, *, position: int | None = None) -> int:
        self._raise_latched()
        check_sequential(position, self._position, stage=self.STAGE, url=self.url)
        view = byte_view(buffer)
        await anyio.lowlevel.checkpoint_if_cancelled()
        filled = 0
        # Shielded: a step that consumed input cannot be undone half-way.
        with anyio.CancelScope(shield=True), self._latching():
            await self._start()
            while filled < view.nbytes:
                count = min(self._out_end - self._out_start, view.nbytes - filled)
                if count:
                    start = self._out_start
                    with memoryview(self._out) as out:
                        view[filled : filled + count] = out[start : start + count]
                    self._out_start += count
                    self._position += count
                    filled += count
                elif self._ended:
                    break
                else:
                    await self._refill()
        return filled

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            await self.inner.close()
        self._out = bytearray()
