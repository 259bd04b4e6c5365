"""The client side of a set served to an engine in another process (docs/transport.md).

``serve_set`` publishes a name, waits for one engine that passes the peer check, and
then drives an in-process ``ServerVirtualDeviceSet`` on the local client set on the
engine's behalf: every engine record becomes the same call an in-process engine would
make, so the client's side (the job, the pumps) cannot tell the difference, and every
rule of the set (state tables, FIFO per device, abort, watchdog) is the in-process
core's. Buffers never cross the socket: the buffer area's memfds go to the engine once
(``SCM_RIGHTS``), and records name buffers by (segment, offset).

How it runs (all inside one task group owned by ``serve_set``; nothing blocks the loop):

* **one reader task** per connection reads and handles records; handling is
  synchronous except ``ALLOCATE_BUFFER``, which may wait long for a free buffer: those
  go to **one allocator task**, first come first served, so the reader keeps reading
  (the ``FREE_BUFFER`` that ends the wait arrives on the same socket).
* **Replies go out as soon as they are ready**, matched by id (docs/transport.md §2.2):
  an ``ALLOCATE_BUFFER`` waiting for a free buffer holds back no other reply, so an
  engine task waiting for a reply never waits behind another task's allocation.
* **Completions** are sent from a done callback on the in-process pending command, and
  **STATE** records (activation, an abort by the client or the watchdog) from a state
  listener on the in-process set: no task per command. On an abort the STATE goes out
  before the outstanding commands' COMPLETIONs (OPERATION_ABORTED). **One watchdog
  task** waits on the set so that its server-timeout watchdog fires on time (in-process
  the engine's own waits run it; here they are in the other process).
* **Sending**: the records of one step of the loop go out as one message (a
  ``call_soon`` flush: one wake-up of the engine for all of them), by a non-blocking
  ``sendmsg``; a message that meets a full socket is queued
  (its file descriptors duplicated, so they stay valid) and **one writer task** flushes
  the queue in order. The queue is bounded (``MAX_QUEUED_RECORDS``): an engine that sends
  requests and never reads the answers aborts the set instead of growing our memory.
* **Death**: EOF before the engine's CLOSE aborts the set at once (cause
  ``PROCESS_DEATH``), unless the engine had already closed every device
  (``NORMALLY_TERMINATED``: what the client still has to take is already here). An
  ``ECONNRESET`` (the engine closed with records of ours unread) comes before the
  records the engine sent last: they are read first, then the EOF.
* **After an abort** the engine gets ``ABORT_GRACE`` seconds to send CLOSE (or
  disconnect); then the connection is closed anyway and ``VDAbortError`` raised. After
  a normal end (every device closed, every command completed) it gets
  ``CLOSE_GRACE``; then the client hangs up and the set ends normally, as on an EOF.
* A **protocol violation** (an undecodable record, a type only the client sends, an id
  in use, FREE_BUFFER of a buffer the engine does not hold, more than
  ``MAX_UNANSWERED`` requests waiting for their reply) aborts the set (cause
  SERVER, the reason names the violation), sends STATE and closes. A SEND_COMMAND on a
  device index never opened is not one: it completes at once with INVALID_HANDLE; one
  naming no buffer the engine holds completes with INVALID_HANDLE, or OPERATION_ABORTED
  after an abort. Its offset
  may point inside a buffer the engine holds (the data then starts there).

Device names: the engine opens devices under the published name's names (``name``,
``name1``, ...); the local set's are ``set_name``'s, so ``name`` followed by nothing or
by digits becomes ``set_name`` followed by the same; any other name is used as it is.
Device indexes on the wire are the order in which the engine opened the devices.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import dataclasses
import enum
import math
import os
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import anyio
import anyio.abc
import anyio.lowlevel

from vdistream.errors import (
    VDAbortError,
    VDIError,
    VDInvalidError,
    VDTimeoutError,
)
from vdistream.log import get_logger
from vdistream.protocol import (
    CommandCode,
    CommandResult,
    Completion,
    HResult,
    ServerState,
    SetAbortCause,
)
from vdistream.protocol.commands import BUFFER_COMMANDS
from vdistream.threads import run_sync
from vdistream.transport import wire
from vdistream.transport.rendezvous import Publication, RuntimeDirectory, peer_credentials
from vdistream.transport.sockets import Gatherer, received_fds
from vdistream.vdi import PendingCommand, Registry, ServerVirtualDevice, ServerVirtualDeviceSet
from vdistream.vdi.buffers import MAX_BUFFERS

__all__ = (
    "ABORT_GRACE",
    "CLOSE_GRACE",
    "MAX_QUEUED_RECORDS",
    "MAX_UNANSWERED",
    "DeviceTraffic",
    "HostResult",
    "serve_set",
)

_log = get_logger(__name__)

#: Seconds an engine has, after the set aborted, to send CLOSE before we hang up.
ABORT_GRACE = 1.0
#: After the last CLOSE_DEVICE, once every command completed: how long the engine has to
#: send CLOSE (or hang up) before the client hangs up; the set ended normally anyway.
CLOSE_GRACE = 30.0
#: Records queued for an engine that does not read them before the set is aborted.
MAX_QUEUED_RECORDS = 16384
#: Requests waiting for their reply (ALLOCATE_BUFFERs waiting for a free buffer) beyond
#: which the engine is in violation: each costs memory here, and an engine cannot need
#: more waiting allocations than the area can have buffers.
MAX_UNANSWERED = MAX_BUFFERS
#: Seconds spent flushing queued records before the connection is closed.
_FLUSH_TIMEOUT = 1.0
#: Records handled in a row before the reader lets other tasks run.
_BATCH = 32
_ANCILLARY = socket.CMSG_SPACE(16 * array.array("i").itemsize)
_I64 = 1 << 63


@dataclasses.dataclass(frozen=True)
class DeviceTraffic:
    """One device as the engine used it: its wire ``index``, its local ``name``, the
    bytes READ and WRITE commands transferred, and the commands sent, by code."""

    index: int
    name: str
    bytes: int
    commands: Mapping[CommandCode, int]


@dataclasses.dataclass(frozen=True)
class HostResult:
    """What ``serve_set`` returns once the engine closed the set normally."""

    engine_pid: int
    engine_uid: int
    features: int  # of the final configuration; 0 if the engine never configured
    devices: tuple[DeviceTraffic, ...]


async def serve_set(
    name: str,
    *,
    registry: Registry,
    set_name: str | None = None,
    instance: str | None = None,
    directory: RuntimeDirectory | None = None,
    connect_timeout: float | None = 60.0,
    job: str = "",
    task_status: anyio.abc.TaskStatus[Path] = anyio.TASK_STATUS_IGNORED,
) -> HostResult:
    """Publish ``name`` and serve the local client set ``set_name or name`` (of
    ``registry``, same ``instance``) to one engine in another process.

    ``task_status.started(socket_path)`` once listening. Waits at most
    ``connect_timeout`` seconds (``None``: forever) for an engine that passes the peer
    check (``VDTimeoutError`` naming the set and the socket otherwise; refused peers
    get REFUSED and do not count). Returns a ``HostResult`` once the engine closed the
    set normally; raises ``VDAbortError`` (the set's abort reason) when the set aborted
    or the engine was lost before it ended. Cancelled: aborts the set if an engine is
    attached and the set has not ended, closes everything and unpublishes.
    """
    directory = directory if directory is not None else RuntimeDirectory()
    publication = await run_sync(directory.publish, instance, name)
    host = _Host(name, set_name or name, registry, instance, directory, job, publication)
    try:
        _log.info("set_published", set_name=name, path=str(publication.path))
        task_status.started(publication.path)
        return await host.run(connect_timeout)
    finally:
        host.shutdown()
        publication.close()
        _log.info("set_unpublished", set_name=name)


class _End(enum.Enum):
    """How the reading of a connection ended."""

    CLOSED = "the engine closed the set"
    LOST = "the connection was lost"
    VIOLATION = "the engine broke the protocol"
    GRACE = "the engine did not close the aborted set in time"


@dataclasses.dataclass(eq=False, slots=True)
class _Answer:
    """A request waiting for its reply; ``record`` is None until it is ready."""

    id: int
    record: wire.Reply | None = None


@dataclasses.dataclass(slots=True)
class _Traffic:
    name: str
    bytes: int = 0
    commands: Counter[CommandCode] = dataclasses.field(default_factory=Counter)


class _Host:
    """One publication and the one engine it serves (module doc)."""

    def __init__(
        self,
        name: str,
        local_name: str,
        registry: Registry,
        instance: str | None,
        directory: RuntimeDirectory,
        job: str,
        publication: Publication,
    ) -> None:
        self.name = name
        self.local_name = local_name
        self.registry = registry
        self.instance = instance
        self.directory = directory
        self.job = job
        self.publication = publication
        self.server: ServerVirtualDeviceSet | None = None
        self.conn: socket.socket | None = None
        self.broken = False  # the connection can no longer carry records
        self.overflowed = False  # the engine stopped reading: more records than we queue
        self.reset = False  # ECONNRESET was read: what the engine sent last comes next
        self.engine: tuple[int, int, int] = (0, 0, 0)  # pid, uid, gid
        self.devices: list[ServerVirtualDevice] = []
        self.traffic: list[_Traffic] = []
        self.commands: dict[int, PendingCommand] = {}
        self.answers: dict[int, _Answer] = {}  # unanswered requests, by id
        self.allocations: deque[tuple[_Answer, int, int]] = deque()
        self.allocations_added = anyio.Event()
        self.buffers: dict[tuple[int, int], memoryview] = {}
        self.segments_sent = 0
        self.features = 0  # of the final configuration
        self.outgoing: deque[tuple[bytes, list[int]]] = deque()
        self.gatherer = Gatherer(lambda data: self.send_message(data, ()))
        self.outgoing_added = anyio.Event()
        self.hangup_deadline: float | None = None
        self.read_scope: anyio.CancelScope | None = None
        self.drained = anyio.Event()  # set (and replaced) each time the writer is done
        self.last_state: ServerState | None = None
        #: cause and reason, once the set aborted (kept: the set forgets at close)
        self.aborted: tuple[SetAbortCause | None, str] | None = None

    # --- the whole life ---------------------------------------------------------------

    async def run(self, connect_timeout: float | None) -> HostResult:
        conn = await self.accept(connect_timeout)
        self.conn = conn
        self.attach()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.refuse_others)
            tg.start_soon(self.write_loop)
            tg.start_soon(self.allocate_loop)
            tg.start_soon(self.watch)
            end = await self.read_loop()
            self.after_reading(end)
            await self.flush()
            tg.cancel_scope.cancel()
        return self.finish(end)

    async def accept(self, timeout: float | None) -> socket.socket:
        """The first connection whose peer passes the check (module doc)."""
        listener = self.publication.socket
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise VDTimeoutError(
                    f"serve_set: no engine opened the set {self.name!r} at "
                    f"{str(self.publication.path)!r} within {timeout} s",
                    set_name=self.local_name,
                )
            with anyio.move_on_after(remaining if remaining is not None else float("inf")):
                await anyio.wait_readable(listener)
            conn = _accept(listener)
            if conn is None:
                continue
            pid, uid, gid = peer_credentials(conn)
            try:
                allowed = await self.may_open(uid, gid)
            except BaseException:
                conn.close()
                raise
            if allowed:
                self.engine = (pid, uid, gid)
                _log.info("engine_connected", set_name=self.name, pid=pid, uid=uid)
                return conn
            _log.warning("engine_refused", set_name=self.name, pid=pid, uid=uid, gid=gid)
            _refuse(conn, HResult.SECURITY, f"uid {uid} may not open the set {self.name!r}")

    async def may_open(self, uid: int, gid: int) -> bool:
        if uid in (os.geteuid(), 0) or self.directory.group is None:
            return self.directory.may_open(uid, gid)
        return await run_sync(self.directory.may_open, uid, gid)  # NSS may block

    async def refuse_others(self) -> None:
        """Every later connection gets REFUSED: the set has its engine."""
        listener = self.publication.socket
        while True:
            await anyio.wait_readable(listener)
            conn = _accept(listener)
            if conn is not None:
                _refuse(conn, HResult.INVALID, f"the set {self.name!r} is already served")

    def attach(self) -> None:
        """Open the local set for the engine and welcome it (REFUSED and the error if
        the local set cannot be opened)."""
        assert self.conn is not None
        server = self.registry.server_set()
        try:
            server.open(self.instance, self.local_name)
        except VDIError as exc:
            _refuse(self.conn, exc.hresult, _message(exc))
            self.conn = None
            raise
        self.server = server
        server.add_state_listener(self.on_state)
        config = server.get_configuration()
        welcome = wire.Welcome(wire.VERSION, os.getpid(), config, self.name, self.job)
        self.send(welcome.encode())

    def after_reading(self, end: _End) -> None:
        """Put the set where ``end`` leaves it: aborted unless the engine ended it."""
        server = self.server
        assert server is not None
        pid = self.engine[0]
        if end is _End.LOST:
            _log.info("engine_lost", set_name=self.name, pid=pid, state=server.state.name)
            if server.state not in (ServerState.NORMALLY_TERMINATED, ServerState.ABORTED):
                self.abort(
                    SetAbortCause.PROCESS_DEATH,
                    f"the engine (pid {pid}) disconnected before it closed the set",
                )
        elif end is _End.GRACE:
            _log.warning("engine_unresponsive", set_name=self.name, pid=pid)

    def finish(self, end: _End) -> HostResult:
        server = self.server
        assert server is not None
        self.close_server()
        if self.aborted is not None:
            raise VDAbortError(
                f"serve_set: the set was aborted ({self.aborted[1]})",
                set_name=self.local_name,
                state="ABORTED",
            )
        return HostResult(
            engine_pid=self.engine[0],
            engine_uid=self.engine[1],
            features=self.features,
            devices=tuple(
                DeviceTraffic(i, t.name, t.bytes, MappingProxyType(dict(t.commands)))
                for i, t in enumerate(self.traffic)
            ),
        )

    def close_server(self) -> None:
        server = self.server
        if server is not None and server.state is not ServerState.DNE:
            with contextlib.suppress(VDIError):
                server.close()

    def shutdown(self) -> None:
        """Whatever happened (cancellation too): abort an unfinished set, close it,
        hang up. Synchronous: nothing here waits."""
        server = self.server
        if server is not None and server.state not in (
            ServerState.DNE,
            ServerState.NORMALLY_TERMINATED,
            ServerState.ABORTED,
        ):
            self.abort(SetAbortCause.CLIENT, "the client stopped serving the set")
        self.close_server()
        self.drop_outgoing()
        if self.conn is not None:
            conn, self.conn = self.conn, None
            conn.close()

    def abort(self, cause: SetAbortCause, reason: str) -> None:
        server = self.server
        if server is not None and server.state is not ServerState.DNE:
            with contextlib.suppress(VDIError):
                server.signal_abort(cause=cause, reason=reason)

    # --- reading ----------------------------------------------------------------------

    async def read_loop(self) -> _End:
        """Read and handle records until the engine closes the set or is lost; ends
        sooner when an aborted set's grace passes or the engine stops reading (one
        scope for the whole loop, whose deadline ``on_state`` moves in on an abort)."""
        deadline = math.inf if self.hangup_deadline is None else self.hangup_deadline
        with anyio.CancelScope(deadline=deadline) as self.read_scope:
            return await self.read_records()
        if self.overflowed:
            reason = f"the engine left more than {MAX_QUEUED_RECORDS} messages unread"
            self.abort(SetAbortCause.SERVER, reason)
            return _End.VIOLATION
        return _End.GRACE

    async def read_records(self) -> _End:
        """Handle records until the session ends (how it ended).

        On asyncio the socket gets one reader callback for the session's whole life,
        which handles records as soon as the loop sees them: no task wakes per batch and
        no epoll registration is made and undone per wait (that cost shows in every
        command's round trip). Elsewhere (trio) this task waits for each batch itself.
        """
        conn = self.conn
        assert conn is not None
        try:
            loop = asyncio.get_running_loop()
            task = asyncio.current_task()
        except RuntimeError:
            loop, task = None, None
        if loop is None or task is None:
            while True:
                end = self.read_batch(conn)
                if end is not None:
                    return end
                self.apply_hangup_deadline()
                await anyio.wait_readable(conn)
        ended: asyncio.Future[_End] = loop.create_future()

        def readable() -> None:
            if ended.done():
                return
            try:
                end = self.read_batch(conn)
            except BaseException as exc:  # a bug of ours: the task raises it
                ended.set_exception(exc)
                return
            if end is not None:
                ended.set_result(end)
            else:
                self.apply_hangup_deadline()

        fd = conn.fileno()
        loop.add_reader(fd, readable)
        try:
            readable()  # what arrived before the callback was in place
            return await ended
        finally:
            loop.remove_reader(fd)

    def read_batch(self, conn: socket.socket) -> _End | None:
        """Handle the records waiting on the socket, at most ``_BATCH`` (the rest on the
        next call, so other tasks get their turn); how the session ended, or None."""
        for _ in range(_BATCH):
            try:
                data, ancdata, flags, _ = conn.recvmsg(
                    wire.MAX_MESSAGE + 1, _ANCILLARY, socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                return None
            except ConnectionResetError:
                # The engine closed its end with records of ours unread: the kernel says
                # so once, before the records it sent last, which are still to be read
                # (then EOF). An engine may close every device and just disconnect.
                if self.reset:
                    return self.lost()
                self.reset = True
                continue
            except BrokenPipeError:
                return self.lost()
            _close_all(received_fds(ancdata))  # an engine has no reason to send any
            if not data:
                return self.lost()
            try:
                if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                    raise wire.WireError(
                        f"a message longer than {wire.MAX_MESSAGE} bytes, or with fds"
                    )
                for record in wire.decode_message(data):
                    if self.handle(record):
                        return _End.CLOSED
            except wire.WireError as exc:
                # decode's refusals and handle()'s (an id in use, an unknown buffer)
                reason = _message(exc)
                _log.warning("engine_protocol_violation", set_name=self.name, reason=reason)
                self.abort(SetAbortCause.SERVER, f"protocol violation by the engine: {reason}")
                return _End.VIOLATION
        return None

    def lost(self) -> _End:
        self.broken = True
        self.drop_outgoing()
        return _End.LOST

    def handle(self, record: wire.Record) -> bool:
        """Handle one engine record; True once the engine closed the set."""
        server = self.server
        assert server is not None
        match record:
            case wire.SendCommand():
                self.send_command(record)
            case wire.FreeBuffer():
                self.free_buffer(record)
            case wire.AllocateBuffer():
                answer = self.request(record.id)
                self.allocations.append((answer, record.size, record.alignment))
                self.allocations_added.set()
            case wire.BeginConfiguration():
                timeout = None if record.timeout_ms < 0 else record.timeout_ms / 1000
                self.call(
                    record.id,
                    lambda: server.begin_configuration(
                        record.features,
                        record.block_size,
                        record.alignment,
                        record.max_transfer_size,
                        timeout,
                        honour_complete=bool(record.honour_complete),
                    ),
                )
            case wire.RequestBuffers():
                self.call(
                    record.id,
                    lambda: server.request_buffers(record.size, record.alignment, record.count),
                    segments=True,
                )
            case wire.EndConfiguration():
                self.end_configuration(record.id)
            case wire.QueryAvailableBuffers():
                self.call(
                    record.id,
                    lambda: (server.query_available_buffers(record.size, record.alignment), 0),
                )
            case wire.OpenDevice():
                self.call(record.id, lambda: self.open_device(record.name))
            case wire.CloseDevice():
                self.call(record.id, lambda: self.device(record.device).close_device())
                self.check_finished()
            case wire.SignalAbort():
                if server.state is not ServerState.DNE:
                    server.signal_abort()
            case wire.Close():
                answer = self.request(record.id)
                self.drop_allocations()
                self.answer(answer, self.reply(record.id, server.close))
                return True
            case _:
                raise wire.WireError(f"{type(record).__name__} is not a record an engine sends")
        return False

    # --- requests and replies -----------------------------------------------------------

    def request(self, ident: int) -> _Answer:
        """Register request ``ident`` as unanswered (its id is in use until the reply)."""
        if ident == 0 or ident in self.commands or ident in self.answers:
            raise wire.WireError(f"request id {ident} is 0 or already in use")
        if len(self.answers) >= MAX_UNANSWERED:
            # Only ALLOCATE_BUFFERs wait: an engine asking for buffers without end.
            raise wire.WireError(f"more than {MAX_UNANSWERED} requests wait for a reply")
        answer = self.answers[ident] = _Answer(ident)
        return answer

    def call(self, ident: int, call: Callable[[], object], *, segments: bool = False) -> None:
        answer = self.request(ident)
        record = self.reply(ident, call, segments=segments)
        self.answer(answer, record)

    def reply(
        self, ident: int, call: Callable[[], object], *, segments: bool = False
    ) -> wire.Reply:
        """Run ``call`` (returning None or (value0, value1)) and the REPLY that says how
        it went; with ``segments``, any new segment of the area goes out first."""
        server = self.server
        assert server is not None
        try:
            values = call()
        except VDIError as exc:
            return wire.Reply(
                ident, exc.hresult, wire.state_code(server.state), data=_message(exc).encode()
            )
        if segments:
            self.send_segments()
        value0, value1 = values if isinstance(values, tuple) else (0, 0)
        return wire.Reply(ident, 0, wire.state_code(server.state), int(value0), int(value1))

    def answer(self, answer: _Answer, record: wire.Reply) -> None:
        """Give ``answer`` its record and send it now (replies are matched by id)."""
        if answer.record is not None:
            return
        answer.record = record
        if self.answers.get(answer.id) is answer:
            del self.answers[answer.id]
        self.send(record.encode())

    def end_configuration(self, ident: int) -> None:
        server = self.server
        assert server is not None
        answer = self.request(ident)
        record = self.reply(ident, server.end_configuration, segments=True)
        config = server.configuration
        if record.hresult == 0 and config is not None:
            self.features = config.features
            record = dataclasses.replace(record, data=config.pack())
        self.answer(answer, record)

    def send_segments(self) -> None:
        server = self.server
        assert server is not None
        for segment in server.segment_files()[self.segments_sent :]:
            self.send(wire.Segment(segment.index, segment.length).encode(), [segment.fd])
            self.segments_sent = segment.index + 1

    def open_device(self, remote: str) -> tuple[int, int]:
        server = self.server
        assert server is not None
        local = remote
        suffix = remote[len(self.name) :]
        if remote.startswith(self.name) and (
            suffix == "" or (suffix.isascii() and suffix.isdigit())
        ):
            local = self.local_name + suffix
        device = server.open_device(local)
        self.devices.append(device)
        self.traffic.append(_Traffic(device.name))
        return len(self.devices) - 1, 0

    def device(self, index: int) -> ServerVirtualDevice:
        if not 0 <= index < len(self.devices):
            raise VDInvalidError(
                f"device index {index} was not opened (the engine opened "
                f"{len(self.devices)} devices)",
                set_name=self.name,
            )
        return self.devices[index]

    async def watch(self) -> None:
        """Run the set's server-timeout watchdog: the engine's waits are in its own
        process, so without this nobody here would when no pump waits either."""
        server = self.server
        assert server is not None
        with contextlib.suppress(VDIError):
            await server.watch()

    # --- buffers --------------------------------------------------------------------

    async def allocate_loop(self) -> None:
        """Answer ALLOCATE_BUFFER requests in order, each once a buffer is free."""
        server = self.server
        assert server is not None
        while True:
            await self.allocations_added.wait()
            self.allocations_added = anyio.Event()
            while self.allocations:
                answer, size, alignment = self.allocations[0]
                try:
                    view = await server.allocate_buffer(size, alignment)
                except VDIError as exc:
                    record = wire.Reply(
                        answer.id,
                        exc.hresult,
                        wire.state_code(server.state),
                        data=_message(exc).encode(),
                    )
                else:
                    segment, offset = server.buffer_position(view)
                    self.buffers[segment, offset] = view
                    state = wire.state_code(server.state)
                    record = wire.Reply(answer.id, 0, state, segment, offset)
                if self.allocations and self.allocations[0][0] is answer:
                    self.allocations.popleft()
                self.answer(answer, record)

    def drop_allocations(self) -> None:
        """The set closes: allocations still waiting are answered with an error."""
        server = self.server
        assert server is not None
        state = wire.state_code(server.state)
        while self.allocations:
            answer, _, _ = self.allocations.popleft()
            self.answer(
                answer,
                wire.Reply(answer.id, HResult.PROTOCOL, state, data=b"the set was closed"),
            )

    def free_buffer(self, record: wire.FreeBuffer) -> None:
        server = self.server
        assert server is not None
        view = self.buffers.pop((record.segment, record.offset), None)
        if view is None:
            if server.aborted_by is not None:
                return  # after an abort nothing is kept; the engine may still free
            raise wire.WireError(
                f"FREE_BUFFER of segment {record.segment} offset {record.offset}, "
                "which is not a buffer the engine holds"
            )
        try:
            server.free_buffer(view)
        except VDIError as exc:
            # docs/transport.md: a refused FREE_BUFFER aborts the set
            self.abort(SetAbortCause.SERVER, f"the engine's free_buffer failed: {_message(exc)}")

    def command_buffer(self, record: wire.SendCommand) -> tuple[memoryview | None, bool]:
        """The buffer view a command names, and whether it is a temporary slice."""
        if record.segment == wire.NO_SEGMENT:
            return None, False
        server = self.server
        assert server is not None
        view = self.buffers.get((record.segment, record.offset))
        if view is not None:
            return view, False
        start = server.buffer_start(record.segment, record.offset)
        view = self.buffers.get(start) if start is not None else None
        if view is None or start is None:
            return None, False
        inner = record.offset - start[1]
        return (view[inner:], True) if inner < view.nbytes else (None, False)

    # --- commands ---------------------------------------------------------------------

    def send_command(self, record: wire.SendCommand) -> None:
        ident, index = record.id, record.device
        if ident == 0 or ident in self.commands or ident in self.answers:
            raise wire.WireError(f"command id {ident} is 0 or already in use")
        if not 0 <= index < len(self.devices):
            self.send(wire.CompletionRecord(ident, index, Completion.INVALID_HANDLE).encode())
            return
        device = self.devices[index]
        view, temporary = self.command_buffer(record)
        try:
            if view is None and record.code in BUFFER_COMMANDS:
                if self.server is not None and self.server.aborted_by is not None:
                    refusal = Completion.OPERATION_ABORTED
                else:
                    refusal = Completion.INVALID_HANDLE
                self.send(wire.CompletionRecord(ident, index, refusal).encode())
                return
            try:
                pending = device.send_command(record.code, record.size, record.position, view)
            except VDIError:
                # Bad arguments: the engine side checks them; here they are a refusal.
                self.send(wire.CompletionRecord(ident, index, Completion.INVALID_HANDLE).encode())
                return
        finally:
            if temporary and view is not None:
                view.release()
        traffic = self.traffic[index]
        traffic.commands[pending.code] += 1
        self.commands[ident] = pending

        def completed(pending: PendingCommand) -> None:
            self.commands.pop(ident, None)
            result: CommandResult = pending.result()
            if pending.code in BUFFER_COMMANDS:
                traffic.bytes += result.bytes_transferred
            # The record's position is an i64; the client's is any int: an unencodable
            # one must not lose the completion (the engine would wait for it forever).
            position = min(max(result.position, -_I64), _I64 - 1)
            self.send(
                wire.CompletionRecord(
                    ident, index, result.completion, result.bytes_transferred, position
                ).encode()
            )
            self.check_finished()

        pending.add_done_callback(completed)

    # --- the set's own events -------------------------------------------------------------

    def on_state(self, state: ServerState) -> None:
        """The set's listener: tell the engine of activation and aborts."""
        if state is self.last_state or state not in (ServerState.ACTIVE, ServerState.ABORTED):
            return
        self.last_state = state
        server = self.server
        cause = server.aborted_by if server is not None else None
        reason = (server.abort_reason if server is not None else None) or ""
        record = wire.StateRecord(wire.state_code(state), wire.cause_code(cause), reason)
        self.send(_fit(record))  # first: nothing below may keep the engine from knowing
        if state is ServerState.ABORTED:
            self.aborted = (cause, reason)
            self.hangup_deadline = time.monotonic() + ABORT_GRACE
            self.apply_hangup_deadline()
            _log.info("set_aborted", set_name=self.name, cause=getattr(cause, "value", None))

    def check_finished(self) -> None:
        """Once the engine closed every device and every command completed, it has
        ``CLOSE_GRACE`` to say CLOSE: an engine that hangs there must not hold the job."""
        server = self.server
        if (
            server is None
            or self.hangup_deadline is not None
            or self.commands
            or server.state is not ServerState.NORMALLY_TERMINATED
        ):
            return
        self.hangup_deadline = time.monotonic() + CLOSE_GRACE
        self.apply_hangup_deadline()

    def apply_hangup_deadline(self) -> None:
        """Bring the reader's deadline in to the abort's grace. An abort signalled outside
        the event loop (the in-process set allows it) cannot move a cancel scope; the
        reader then applies it when it next wakes (the engine answers the STATE)."""
        scope, deadline = self.read_scope, self.hangup_deadline
        if scope is None or deadline is None or scope.deadline <= deadline:
            return
        with contextlib.suppress(RuntimeError):  # no running loop here
            scope.deadline = deadline

    # --- writing ----------------------------------------------------------------------

    def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send one record, with the others of this step of the loop (``Gatherer``); a
        record with descriptors goes alone, after what was gathered."""
        if self.conn is None or self.broken:
            return
        if fds:
            self.gatherer.flush()
            self.send_message(data, fds)
            return
        self.gatherer.add(data)

    def send_message(self, data: bytes, fds: Sequence[int]) -> None:
        """Send one message now, or queue it for the writer if the socket is full."""
        conn = self.conn
        if conn is None or self.broken:
            return
        if not self.outgoing:
            try:
                _sendmsg(conn, data, fds)
                return
            except BlockingIOError:
                pass
            except OSError:
                self.broken = True  # the reader sees the EOF and ends the session
                return
        if len(self.outgoing) >= MAX_QUEUED_RECORDS:
            # This may run inside the set's bookkeeping (a done callback, a listener),
            # which must not be re-entered: the reader aborts the set.
            self.broken = self.overflowed = True
            self.drop_outgoing()
            if self.read_scope is not None:
                self.read_scope.cancel()
            return
        self.outgoing.append((data, [os.dup(fd) for fd in fds]))
        self.outgoing_added.set()

    async def write_loop(self) -> None:
        """The one task that writes queued records (the only writable-waiter)."""
        while True:
            await self.outgoing_added.wait()
            self.outgoing_added = anyio.Event()
            await self.write_queued()
            drained, self.drained = self.drained, anyio.Event()
            drained.set()

    async def write_queued(self) -> None:
        conn = self.conn
        while self.outgoing and conn is not None and not self.broken:
            data, fds = self.outgoing[0]
            try:
                _sendmsg(conn, data, fds)
            except BlockingIOError:
                await anyio.wait_writable(conn)
                continue
            except OSError:
                self.broken = True
                break
            self.outgoing.popleft()
            _close_all(fds)
        if self.broken or self.conn is None:
            # Only then: records gathered for this step's message (flushed after this
            # task's turn) are still to go out behind the queue just emptied.
            self.drop_outgoing()

    async def flush(self) -> None:
        """Send what is queued (bounded): the engine's last REPLY, STATE, COMPLETIONs."""
        self.gatherer.flush()
        with anyio.move_on_after(_FLUSH_TIMEOUT):
            while self.outgoing and not self.broken:
                await self.drained.wait()

    def drop_outgoing(self) -> None:
        self.gatherer.clear()
        while self.outgoing:
            _close_all(self.outgoing.popleft()[1])


# --- helpers ---------------------------------------------------------------------------


def _accept(listener: socket.socket) -> socket.socket | None:
    try:
        conn, _ = listener.accept()
    except (BlockingIOError, InterruptedError, ConnectionAbortedError):
        return None
    conn.setblocking(False)
    return conn


def _refuse(conn: socket.socket, hresult: int, message: str) -> None:
    """Send REFUSED (best effort: a fresh socket has room) and close."""
    try:
        _sendmsg(conn, _fit(wire.Refused(hresult, message)), ())
    except OSError:
        pass
    finally:
        conn.close()


def _sendmsg(conn: socket.socket, data: bytes, fds: Sequence[int]) -> None:
    ancillary = (
        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    )
    conn.sendmsg([data], ancillary, socket.MSG_NOSIGNAL)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _fit(record: wire.Refused | wire.StateRecord) -> bytes:
    """Encode a record whose text may be long, cutting the text to fit MAX_RECORD."""
    try:
        return record.encode()
    except ValueError:
        room = wire.MAX_RECORD - 64
        if isinstance(record, wire.Refused):
            text = record.message.encode()[:room].decode("utf-8", "ignore")
            return dataclasses.replace(record, message=text).encode()
        text = record.reason.encode()[:room].decode("utf-8", "ignore")
        return dataclasses.replace(record, reason=text).encode()


def _message(exc: VDIError) -> str:
    """``exc``'s message without the ``VD_E_X:`` prefix and the ``(set ..., device ...,
    state ...)`` suffix the engine side adds again with its own names."""
    text = str(exc)
    head, sep, rest = text.partition(": ")
    if sep and (head.startswith("VD_E_") or head.startswith("HRESULT ")):
        text = rest
    where = []
    if exc.set_name is not None:
        where.append(f"set {exc.set_name!r}")
    if exc.device is not None:
        where.append(f"device {exc.device!r}")
    if exc.state is not None:
        where.append(f"state {getattr(exc.state, 'name', exc.state)}")
    suffix = f" ({', '.join(where)})"
    if where and text.endswith(suffix):
        text = text[: -len(suffix)]
    return text
