"""Engines in another process: a job's set published by name, and the engine side of it.

``ExternalBackup(name)`` and ``ExternalRestore(name)`` are the *client's* half of a job
whose engine runs elsewhere (``vdistream feed NAME``, ``vdistream drain NAME``, the C
example, any program that speaks ``docs/transport.md``). Their ``run`` publishes the
job's client set under ``name`` in a runtime directory
(``vdistream.transport.host.serve_set``) and serves the one engine that opens it, until
that engine closes the set. The job's set is named ``name`` too (``Engine.set_name``),
so the device names the client sees are the ones the engine opens (``name``,
``name1``, ...).

* No engine within ``connect_timeout`` seconds: ``EngineError`` in one line naming the
  set, the socket it waited on, the timeout, and ``vdistream feed NAME`` (or ``drain``)
  as the way to start one. Nothing was written: the job aborts before any device opened.
* The name is already published (another live job), or the runtime directory is not
  usable: ``EngineError`` with the rendezvous' own message.
* The engine dies (kill -9 included), aborts, or breaks the protocol: the host aborts
  the set at once and this raises ``EngineAbortedError`` with the set's reason.
* Cancellation: ``serve_set`` aborts the set if an engine is attached, unpublishes the
  name, and the cancellation propagates.

``busy`` is true while the set waits for its engine to configure it: the coordinator's
stall watchdog does not count that wait, and ``configuration_wait`` makes the job wait
for the configuration ``connect_timeout`` plus 30 seconds at least (both bound it).

The engine side in this process is ``feed`` (a byte stream striped and framed over the
set's devices exactly as ``StripedBackup`` does, read from a file descriptor: standard
input for the command line) and ``drain`` (``StripedRestore`` into a file descriptor),
both run over ``vdistream.transport.engine.RemoteRegistry``. ``FdProducer`` and
``FdConsumer`` are their ends: a pipe, socket or terminal is waited on in the event
loop (a pool thread must never wait for another process), and that wait checks the
set's state every ``_STOP_POLL`` seconds: an abort by the client (or its death) ends a
feed whose writer is silent, or a drain whose reader stopped reading, at once; a
regular file or a device that cannot be waited on is read or written in the data
path's thread pool.

``vdistream.transport`` is imported when a job runs, not when this module is.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import re
import select
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from vdistream import threads
from vdistream.engines.base import (
    DeviceStats,
    Direction,
    Engine,
    EngineAbortedError,
    EngineError,
    EngineResult,
    freeze_counts,
)
from vdistream.engines.streams import ByteConsumer, ByteProducer
from vdistream.engines.striping import StripedBackup, StripedRestore, StripingOptions
from vdistream.errors import ConfigError, VDAbortError, VDIError, VDTimeoutError
from vdistream.protocol import ClientState
from vdistream.vdi import ClientSet, Registry, default_registry

if TYPE_CHECKING:
    from vdistream.engines.session import ServerSession
    from vdistream.transport.host import HostResult
    from vdistream.transport.rendezvous import RuntimeDirectory

__all__ = (
    "DEFAULT_CONNECT_TIMEOUT",
    "SCHEME",
    "ExternalBackup",
    "ExternalOptions",
    "ExternalRestore",
    "ExternalResult",
    "FdConsumer",
    "FdProducer",
    "FeedSummary",
    "SetAbortedError",
    "check_socket_path",
    "drain",
    "external_name",
    "feed",
)

#: The source and target prefix: ``external:NAME``.
SCHEME = "external:"
#: How long a published set waits for its engine by default (seconds).
DEFAULT_CONNECT_TIMEOUT = 60.0


def external_name(url: str) -> str:
    """The set name of ``external:NAME``; ``ConfigError`` (a usage error) when there is
    none or it breaks the rendezvous' rules (1..100 bytes of UTF-8, no '/', '\\' or
    NUL, not starting with '.'). Whether its socket path fits under the runtime
    directory is ``check_socket_path``'s."""
    name = url[len(SCHEME) :] if url.lower().startswith(SCHEME) else ""
    if not name or name != name.strip():
        raise ConfigError(
            f"{url!r} names no virtual device set: write external:NAME (NAME: the set's "
            "name, as the engine opens it, e.g. `vdistream feed NAME`)"
        )
    from vdistream.transport.rendezvous import RuntimeDirectory

    try:  # the shortest directory: only the name's own rules can fail
        RuntimeDirectory(Path("/")).socket_path(None, name)
    except VDIError as exc:
        raise ConfigError(f"{url!r}: {_reason(exc)}") from None
    return name


def check_socket_path(name: str, directory: Path | None = None) -> Path:
    """The socket path the set ``name`` is published at in ``directory`` (``None``:
    the default runtime directory); ``ConfigError`` naming both when the name is not
    valid or the path does not fit in a Unix socket address."""
    from vdistream.transport.rendezvous import RuntimeDirectory

    try:
        return RuntimeDirectory(directory).socket_path(None, name)
    except VDIError as exc:
        raise ConfigError(_reason(exc)) from None


@dataclasses.dataclass(frozen=True)
class ExternalOptions:
    """Where and how long a published set waits for its engine.

    ``directory``: the runtime directory (``None``: ``default_runtime_dir()``:
    ``$VDISTREAM_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/vdistream``, else
    ``/tmp/vdistream-<uid>``; the daemon passes ``/run/vdistream``). ``group``: a group
    whose members may open the set too (socket mode 0660), ``None``: the owner only.
    ``connect_timeout``: seconds to wait for an engine (``None``: forever).
    """

    directory: Path | None = None
    group: int | str | None = None
    connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT

    def runtime(self) -> RuntimeDirectory:
        from vdistream.transport.rendezvous import RuntimeDirectory

        return RuntimeDirectory(self.directory, group=self.group)

    def job_configuration_timeout(self, configure: float = 30.0) -> float:
        """The coordinator's ``configuration_timeout`` for such a job: the wait for the
        engine plus ``configure`` seconds for it to configure the set."""
        wait = self.connect_timeout
        return (wait if wait is not None else 365 * 86400.0) + configure


@dataclasses.dataclass(frozen=True, slots=True)
class ExternalResult(EngineResult):
    """An ``EngineResult`` of an engine in another process: which one it was.

    ``logical_bytes`` is the stream the engine wrote or read (what it put inside is
    its own business), as for SQL Server.
    """

    name: str = ""
    engine_pid: int = 0
    engine_uid: int = 0


class _External(Engine):
    """What backup and restore share: the name, the options, one run per object."""

    def __init__(self, name: str, options: ExternalOptions | None = None, *, job: str = "") -> None:
        self.name = name
        self.set_name = name  # the job's set is the published one: same device names
        self.options = options if options is not None else ExternalOptions()
        # the job's wait for the configuration covers the wait for the engine
        self.configuration_wait = self.options.job_configuration_timeout()
        self.job = job
        self._client: ClientSet | None = None
        self._ran = False

    @property
    def busy(self) -> bool:
        # Waiting for the engine to connect and configure moves nothing; it has its own
        # bounds (connect_timeout, the job's configuration timeout).
        return self._client is not None and self._client.state is ClientState.CONFIGURABLE

    def client_set(self, registry: Registry | None = None) -> ClientSet:
        self._client = super().client_set(registry)
        return self._client

    def _command(self) -> str:
        return "feed" if self.direction is Direction.BACKUP else "drain"

    async def run(self, set_name: str, *, registry: Registry | None = None) -> EngineResult:
        if self._ran:
            raise RuntimeError(f"{type(self).__name__} serves one job; build a new one")
        self._ran = True
        from vdistream.transport.host import serve_set

        try:
            directory = self.options.runtime()
            socket = directory.socket_path(None, self.name)
        except VDIError as exc:
            raise EngineError(f"cannot publish the set {self.name!r}: {_reason(exc)}") from exc
        timeout = self.options.connect_timeout
        listening = _Listening()
        try:
            host = await serve_set(
                self.name,
                registry=registry if registry is not None else default_registry,
                set_name=set_name,
                directory=directory,
                connect_timeout=timeout,
                job=self.job,
                task_status=listening,
            )
        except VDTimeoutError as exc:
            raise EngineError(
                f"no engine opened the set {self.name!r} within {timeout:g} s (it waited at "
                f"{socket}); start one there, e.g. `vdistream {self._command()} {self.name}"
                + (f" --runtime-dir {directory.path}`" if self.options.directory else "`")
            ) from exc
        except VDAbortError as exc:
            raise EngineAbortedError(
                f"the set {self.name!r} was aborted", reason=_abort_reason(exc)
            ) from exc
        except VDIError as exc:
            failed = "failed" if listening.path is not None else "could not be published"
            raise EngineError(f"the set {self.name!r} {failed}: {_reason(exc)}") from exc
        except OSError as exc:
            raise EngineError(
                f"cannot publish the set {self.name!r} at {socket}: {_os_reason(exc)}"
            ) from exc
        return self._result(set_name, host)

    def _result(self, set_name: str, host: HostResult) -> ExternalResult:
        devices = tuple(
            DeviceStats(
                index=d.index, name=d.name, bytes=d.bytes, commands=freeze_counts(d.commands)
            )
            for d in host.devices
        )
        return ExternalResult(
            direction=self.direction,
            set_name=set_name,
            devices=devices,
            logical_bytes=sum(d.bytes for d in devices),
            features=host.features,
            name=self.name,
            engine_pid=host.engine_pid,
            engine_uid=host.engine_uid,
        )


_ABORTED = re.compile(r"the set was aborted \((?P<reason>.*?)\)(?: \(set [^()]*\))?$")


def _abort_reason(exc: VDAbortError) -> str:
    """Why the host says the set was aborted (the engine died, aborted, broke the
    protocol; the client's own abort), without the codes and places around it."""
    text = _reason(exc)
    match = _ABORTED.search(text)
    reason = match["reason"] if match else text
    if reason == "the server signalled abort":  # the core's words for an engine's abort
        return "the engine in the other process aborted it (its own output says why)"
    return reason


_WHERE = re.compile(r" \(set '[^']*'(?:, [^()]*)?\)$")


def _reason(exc: VDIError) -> str:
    """A VDI error's message without its ``VD_E_...: `` prefix and its ``(set ...)``
    suffix: the user's line says what failed, and where, in words."""
    text = _WHERE.sub("", str(exc))
    head, sep, rest = text.partition(": ")
    return rest if sep and (head.startswith("VD_E_") or head.startswith("HRESULT")) else text


def _os_reason(exc: OSError) -> str:
    """``PATH: No such file or directory``, without Python's ``[Errno N]``."""
    if exc.strerror is None:
        return str(exc)
    return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror


class _Listening:
    """``serve_set``'s task status: where it listens, once it does (``None`` before:
    a failure then is the publication's)."""

    path: Path | None = None

    def started(self, value: Path | None = None) -> None:
        self.path = value


class ExternalBackup(_External):
    """A backup whose engine is in another process (module docstring)."""

    @property
    def direction(self) -> Direction:
        return Direction.BACKUP


class ExternalRestore(_External):
    """A restore whose engine is in another process (module docstring)."""

    @property
    def direction(self) -> Direction:
        return Direction.RESTORE


# --- file descriptors as producer and consumer ---------------------------------------


#: How often a wait on a pipe, socket or terminal checks whether the set was aborted.
_STOP_POLL = 0.05


class SetAbortedError(Exception):
    """A wait on a file descriptor gave up: the set it feeds or drains was aborted."""


async def _wait(fd: int, readable: bool, stopped: Callable[[], bool] | None) -> None:
    """Until ``fd`` is readable (writable); ``SetAbortedError`` as soon as ``stopped()``
    says so (checked every ``_STOP_POLL`` s): a silent writer or a reader that stopped
    reading must not keep an aborted feed or drain alive."""
    wait = anyio.wait_readable if readable else anyio.wait_writable
    if stopped is None:
        await wait(fd)
        return
    while not stopped():
        with anyio.move_on_after(_STOP_POLL) as scope:
            await wait(fd)
        if not scope.cancelled_caught:
            return
    raise SetAbortedError("the set was aborted")


def _pollable(fd: int, events: int) -> bool:
    """Whether ``fd`` can be waited on (a pipe, a socket, a terminal); a regular file
    or a device like ``/dev/null`` or ``/dev/urandom`` cannot (``EPERM``), and never
    makes a reader or writer wait long: those are read and written in threads."""
    with select.epoll() as poll:
        try:
            poll.register(fd, events)
        except PermissionError:
            return False
    return True


class FdProducer(ByteProducer):
    """The bytes read from the file descriptor ``fd`` (not closed: the caller's).

    A pipe, a socket or a terminal is awaited in the event loop and read once it is
    readable, so the wait can be cancelled; a regular file or a device that cannot be
    waited on (``/dev/urandom``) is read in the data path's thread pool.
    ``bytes_read`` counts what was produced.
    """

    def __init__(self, fd: int, stopped: Callable[[], bool] | None = None) -> None:
        self.fd = fd
        #: when it returns true, a wait for input raises ``SetAbortedError``
        self.stopped = stopped
        self.bytes_read = 0
        self._threaded: bool | None = None
        self._done = False

    async def readinto(self, view: memoryview) -> int:
        if self._done:
            return 0
        if self._threaded is None:
            self._threaded = not _pollable(self.fd, select.EPOLLIN)
        if self._threaded:
            count = await threads.run_sync(os.readv, self.fd, [view])
        else:
            while True:
                await _wait(self.fd, True, self.stopped)
                try:
                    count = os.readv(self.fd, [view])
                    break
                except BlockingIOError:  # someone else read it first
                    continue
        if not count:
            self._done = True
        self.bytes_read += count
        return count


class FdConsumer(ByteConsumer):
    """Writes the restored bytes to the file descriptor ``fd`` (not closed).

    A pipe, a socket or a terminal is switched to non-blocking mode for the run
    (restored by ``finish``/``discard``) and written from the event loop as it becomes
    writable: a reader that stops reading then stalls the restore without holding a
    thread, and an abort interrupts it. A regular file or a device that cannot be
    waited on (``/dev/null``) is written in the data path's thread pool. A reader that
    went away fails the restore (``BrokenPipeError``). ``bytes_written`` counts what was
    taken.
    """

    def __init__(self, fd: int, stopped: Callable[[], bool] | None = None) -> None:
        self.fd = fd
        #: when it returns true, a wait for the reader raises ``SetAbortedError``
        self.stopped = stopped
        self.bytes_written = 0
        self._threaded: bool | None = None
        self._flags: int | None = None

    def _prepare(self) -> bool:
        if self._threaded is None:
            self._threaded = not _pollable(self.fd, select.EPOLLOUT)
            if not self._threaded:
                self._flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
                fcntl.fcntl(self.fd, fcntl.F_SETFL, self._flags | os.O_NONBLOCK)
        return self._threaded

    def _restore_flags(self) -> None:
        if self._flags is not None:
            flags, self._flags = self._flags, None
            try:
                fcntl.fcntl(self.fd, fcntl.F_SETFL, flags)
            except OSError:
                pass  # the descriptor is gone: nothing left to restore

    async def write(self, view: memoryview) -> None:
        if self._prepare():
            await threads.run_sync(_write_all, self.fd, view)
        else:
            done = 0
            while done < view.nbytes:
                try:
                    done += os.write(self.fd, view[done:])
                except BlockingIOError:
                    await _wait(self.fd, False, self.stopped)
        self.bytes_written += view.nbytes

    async def finish(self) -> None:
        self._restore_flags()

    async def discard(self) -> None:
        self._restore_flags()


def _write_all(fd: int, view: memoryview) -> None:
    done = 0
    while done < view.nbytes:
        done += os.write(fd, view[done:])


# --- the engine side in this process: feed and drain ---------------------------------


@dataclasses.dataclass(frozen=True)
class FeedSummary:
    """What ``feed`` or ``drain`` moved: the stream's bytes (``logical_bytes``), over how
    many devices, in how long."""

    name: str
    logical_bytes: int
    devices: int
    seconds: float
    result: EngineResult


class _CheckedBackup(StripedBackup):
    """``StripedBackup`` that first checks the set's device count (``devices``)."""

    def __init__(self, source: ByteProducer, options: StripingOptions, devices: int | None):
        super().__init__(source, options)
        self.devices = devices
        self.found: int | None = None  # the set's count, when it was not ``devices``

    async def _backup(self, s: ServerSession) -> EngineResult:
        if self.devices is not None and s.device_count != self.devices:
            self.found = s.device_count
            raise s.error(f"the set has {s.device_count} devices, not {self.devices}")
        _stop_on_abort(self.producer, s)
        return await super()._backup(s)

    async def _fill(self, s: ServerSession, buffer: memoryview) -> int:
        try:
            return await super()._fill(s, buffer)
        except EngineError as exc:
            if isinstance(exc.__cause__, SetAbortedError):
                raise s.aborted_error() from None
            raise


class _CheckedRestore(StripedRestore):
    """``StripedRestore`` whose wait for a stalled reader ends when the set aborts."""

    async def _restore(self, s: ServerSession) -> EngineResult:
        _stop_on_abort(self.consumer, s)
        return await super()._restore(s)

    async def _deliver(self, s: ServerSession, view: memoryview) -> None:
        try:
            await super()._deliver(s, view)
        except EngineError as exc:
            if isinstance(exc.__cause__, SetAbortedError):
                raise s.aborted_error() from None
            raise


def _stop_on_abort(end: object, s: ServerSession) -> None:
    """Make an ``FdProducer``'s or ``FdConsumer``'s waits end once the set is aborted
    (by the other side, or its death): nothing else would interrupt them."""
    if isinstance(end, FdProducer | FdConsumer):
        sds = s.sds
        end.stopped = lambda: sds.abort_reason is not None


def _remote(directory: Path | None) -> Registry:
    from vdistream.transport.engine import RemoteRegistry
    from vdistream.transport.rendezvous import RuntimeDirectory

    return RemoteRegistry(RuntimeDirectory(directory))


async def feed(
    name: str,
    fd: int = 0,
    *,
    devices: int | None = None,
    directory: Path | None = None,
    options: StripingOptions | None = None,
) -> FeedSummary:
    """Open the published set ``name`` as its engine and back up what ``fd`` yields into
    it, striped and framed as ``StripedBackup`` does, until the end of the input.

    ``devices``: the count the set must have; otherwise ``ConfigError`` (a usage error:
    the set was opened, then aborted). Any other failure is the engine's ``EngineError``
    (the set was aborted and closed; the backup on the other side fails).
    """
    engine = _CheckedBackup(FdProducer(fd), options or StripingOptions(), devices)
    started = time.monotonic()
    try:
        result = await engine.run(name, registry=_remote(directory))
    except EngineError as exc:
        if engine.found is not None:
            raise ConfigError(
                f"--devices {devices}: the set {name!r} has {engine.found} devices "
                f"(its backup was aborted)"
            ) from exc
        raise
    return FeedSummary(
        name, result.logical_bytes, len(result.devices), time.monotonic() - started, result
    )


async def drain(
    name: str,
    fd: int = 1,
    *,
    directory: Path | None = None,
    options: StripingOptions | None = None,
) -> FeedSummary:
    """Open the published set ``name`` as the engine of a restore and write the
    reassembled, verified stream to ``fd`` (``StripedRestore``). The bytes reach ``fd``
    as they are reassembled: a failure after some of them cannot take them back."""
    engine = _CheckedRestore(FdConsumer(fd), options or StripingOptions())
    started = time.monotonic()
    result = await engine.run(name, registry=_remote(directory))
    return FeedSummary(
        name, result.logical_bytes, len(result.devices), time.monotonic() - started, result
    )
