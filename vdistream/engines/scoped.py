"""Engines over producers and consumers that need a scope of their own.

The real engines (a command, SQLite, PostgreSQL) do not stripe or frame anything
themselves: they hand a ``ByteProducer`` to ``StripedBackup`` or a ``ByteConsumer``
to ``StripedRestore``, which own the device protocol and the stream format. What
they add is an *endpoint* with a lifetime: a subprocess whose standard error must be
read while it runs, a temporary snapshot file, a directory being extracted into. Such
an endpoint is a ``ScopedStream``: ``running()`` is an async context manager that

* checks the cheap preconditions first (a target that must not exist, a data
  directory that must be empty) and raises before the set is even opened;
* owns whatever tasks the endpoint needs (a task group, entered and left by the
  engine's own task, so structured concurrency holds);
* on exit, whatever happened, releases everything: a process is terminated and
  reaped, a temporary file removed, a worker thread joined.

``ScopedBackup(producer)`` and ``ScopedRestore(consumer)`` are the engines: they enter
``running()`` around the striping engine's ``run``. It reports a failing producer
or consumer as a generic ``EngineError`` ("the producer failed: ..."); an endpoint's
own ``EndpointError`` (for example ``ProducerFailedError``, carrying the tool's
exit status and standard error) is found in that error's causes and raised instead,
with the set's name filled in, so that callers can tell what failed by its class.
"""

from __future__ import annotations

import abc
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import anyio.abc

from vdistream.engines.base import EngineError, EngineResult
from vdistream.engines.streams import ByteConsumer, ByteProducer
from vdistream.engines.striping import StripedBackup, StripedRestore
from vdistream.vdi import Registry

__all__ = (
    "EndpointError",
    "ScopedBackup",
    "ScopedRestore",
    "ScopedStream",
    "TargetExistsError",
    "endpoint_tasks",
    "surface_endpoint_error",
)


class EndpointError(EngineError):
    """The engine's producer or consumer (a tool, a file, a directory) failed.

    ``detail`` is the message without the set's name; the engine fills ``set_name`` in
    when the error leaves it (``locate``).
    """

    def __init__(
        self, message: str, *, set_name: str | None = None, device: str | None = None
    ) -> None:
        self.detail = message
        super().__init__(message, set_name=set_name, device=device)

    def locate(self, set_name: str) -> None:
        """Name the set this error happened in (once; in place, keeping the traceback)."""
        if self.set_name is None:
            self.set_name = set_name
            where = [f"set {set_name!r}"]
            if self.device is not None:
                where.append(f"device {self.device!r}")
            self.args = (f"{self.detail} ({', '.join(where)})",)


class TargetExistsError(EndpointError):
    """A restore target already exists (or is not empty) and may not be replaced."""


class ScopedStream(abc.ABC):
    """A producer or consumer with a lifetime of its own (module docstring).

    Its helpers serve endpoints that move bytes through a non-blocking pipe end
    (``_fd``) waited on with anyio, and count what they wrote (``bytes_written``).
    """

    _fd: int | None = None
    bytes_written = 0

    @abc.abstractmethod
    def running(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Check preconditions, own the endpoint's tasks, release everything on exit."""

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            anyio.notify_closing(fd)
            os.close(fd)

    async def _write_fd(self, fd: int, view: memoryview) -> None:
        """All of ``view`` into ``fd``, waiting while the pipe is full and counting
        what went in; raises what ``os.write`` raises (``BrokenPipeError``: the reader
        is gone)."""
        remaining = view
        while remaining.nbytes:
            try:
                count = os.write(fd, remaining)
            except BlockingIOError:
                await anyio.wait_writable(fd)
                continue
            remaining = remaining[count:]
            self.bytes_written += count


@contextlib.asynccontextmanager
async def endpoint_tasks(
    cleanup: Callable[[], Awaitable[None]],
) -> AsyncIterator[anyio.abc.TaskGroup]:
    """The task group of an endpoint's ``running()``: whatever the body did, ``cleanup``
    runs shielded, then what is left of the group is cancelled (a reader whose pipe a
    grandchild holds open); the body's error is re-raised outside the group, as is."""
    error: BaseException | None = None
    async with anyio.create_task_group() as group:
        try:
            yield group
        except BaseException as exc:  # re-raised below, outside the task group
            error = exc
        finally:
            with anyio.CancelScope(shield=True):
                await cleanup()
            group.cancel_scope.cancel()
    if error is not None:
        raise error


def surface_endpoint_error(exc: BaseException) -> EndpointError | None:
    """The endpoint's own error in ``exc`` or its causes, if there is one."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, EndpointError):
            return current
        current = current.__cause__
    return None


@contextlib.asynccontextmanager
async def _endpoint_scope(endpoint: object, set_name: str) -> AsyncIterator[None]:
    """``endpoint.running()`` when it is a ``ScopedStream``; endpoint errors surfaced."""
    try:
        async with contextlib.AsyncExitStack() as stack:
            if isinstance(endpoint, ScopedStream):
                await stack.enter_async_context(endpoint.running())
            yield
    except EngineError as exc:
        found = surface_endpoint_error(exc)
        if found is None or found is exc:
            if found is not None:
                found.locate(set_name)
            raise
        found.locate(set_name)
        # The striping engine's wrapper ("the producer failed: ...") only repeats it.
        raise found from found.__cause__
    except Exception as exc:
        # An endpoint's precondition or cleanup failing outside any EngineError.
        raise EngineError(
            f"the engine's endpoint failed: {type(exc).__name__}: {exc}", set_name=set_name
        ) from exc


class ScopedBackup(StripedBackup):
    """``StripedBackup(producer)`` inside the producer's ``running()`` scope.

    The stream on the devices is exactly the striping engine's (same framing, same striping),
    so ``StripedRestore`` (or ``ScopedRestore``) reads it back.
    """

    producer: ByteProducer

    @property
    def busy(self) -> bool:
        return bool(getattr(self.producer, "busy", False))

    async def run(self, set_name: str, *, registry: Registry | None = None) -> EngineResult:
        self._claim()
        async with _endpoint_scope(self.producer, set_name):
            return await self._serve(set_name, registry)
        raise AssertionError("unreachable")  # pragma: no cover - mypy: the scope may swallow


class ScopedRestore(StripedRestore):
    """``StripedRestore(consumer)`` inside the consumer's ``running()`` scope."""

    consumer: ByteConsumer

    async def run(self, set_name: str, *, registry: Registry | None = None) -> EngineResult:
        self._claim()
        async with _endpoint_scope(self.consumer, set_name):
            return await self._serve(set_name, registry)
        raise AssertionError("unreachable")  # pragma: no cover - mypy: the scope may swallow
