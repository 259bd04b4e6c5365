"""The engine's side of a set another process serves (``docs/transport.md``).

``RemoteServerVirtualDeviceSet`` keeps api.md's server names and the in-process
``ServerVirtualDeviceSet``'s errors, states and results; the calls that must wait for
the client process are coroutines here (``vdistream.vdi.contract.ServerSet``).
``RemoteRegistry`` hands one out from ``server_set()``, so any engine (a
``ServerSession``) runs over a set served by another process unchanged.

How it works, and the choices made:

* **One connection, one reader.** ``open`` connects to the set's socket (the
  ``RuntimeDirectory``'s rendezvous) and starts, in the task group ``async with`` owns,
  one task for the connection (shielded: it ends when the set is closed, not when a
  caller is cancelled, so that the way out of a cancelled engine still reaches the
  client). It applies every record (WELCOME, REPLY, SEGMENT, COMPLETION, STATE) as soon
  as it arrives, from a reader callback on asyncio (no task wake per record), and a
  second task writes the records the socket could not take right away. No call ever
  blocks on the socket: a record is sent at once when the socket takes it, else queued
  for that writer, in order.
* **The state is mirrored**: WELCOME makes it CONNECTED, each REPLY carries the state
  after the request, STATE records bring activation and aborts. Calls are checked
  against the server's state table locally, with the in-process messages; what only the
  client can check (alignments, buffer sizes) it checks, and its error comes back in
  the REPLY as the same ``VDIError`` subclass with the client's message.
* **Zero copy.** Each SEGMENT's memfd is mapped ``MAP_SHARED``; ``allocate_buffer``
  returns a view of this process's mapping at the (segment, offset) the client chose,
  and commands name buffers by (segment, offset) again. Data never crosses the socket.
  Each segment is mapped at a 64 KiB boundary (``vdi.buffers.map_aligned``), as the
  client maps it, so a buffer has here the alignment the client laid it out with.
* **Abort is local first.** ``signal_abort`` aborts this side at once (every waiter
  raises ``VDAbortError``, every outstanding command completes with
  ``OPERATION_ABORTED``), then tells the client. A STATE (ABORTED) from the client does
  the same. A lost connection before our CLOSE means the client process died: the set
  aborts at once with cause ``PROCESS_DEATH``. A record that breaks the protocol aborts
  the set too (cause ``SERVER``, the engine's decision), and the client is told.
* **Waits.** Every wait ends on its reply, on an abort, on a lost connection, on
  cancellation, and (except ``allocate_buffer``, which waits for a free buffer as long
  as the set lives) after ``reply_timeout`` seconds (``VDTimeoutError``). A request
  whose caller stopped waiting is still answered: its reply is applied (an opened
  device stays open), and a buffer allocated for nobody is freed at once.
* **Close** sends CLOSE and waits (``close_timeout``) for its reply, then releases the
  mappings: views handed out are released, as ``ServerVirtualDeviceSet.close`` does. A
  command the client still held completes with ``OPERATION_ABORTED`` (no COMPLETION
  can come over the closed connection: its waiter must not wait forever).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import fcntl
import itertools
import math
import mmap
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Generator
from types import TracebackType
from typing import Any, Self

import anyio
import anyio.abc
import anyio.lowlevel

from vdistream.errors import (
    VDAbortError,
    VDClosedError,
    VDIError,
    VDInvalidError,
    VDMemoryError,
    VDOpenError,
    VDProtocolError,
    VDTimeoutError,
)
from vdistream.log import get_logger
from vdistream.protocol import (
    CommandCode,
    CommandResult,
    Completion,
    HResult,
    ServerCall,
    ServerState,
    SetAbortCause,
    SetEvent,
    VDConfig,
    server_event,
    server_transition,
)
from vdistream.protocol.commands import BUFFER_COMMANDS
from vdistream.protocol.config import ALIGNMENT_MAX, is_power_of_two
from vdistream.transport import wire
from vdistream.transport.rendezvous import RuntimeDirectory
from vdistream.transport.sockets import Gatherer, received_fds
from vdistream.vdi._notify import Notifier
from vdistream.vdi.buffers import address_of, map_aligned
from vdistream.vdi.registry import Registry

__all__ = (
    "RemotePendingCommand",
    "RemoteRegistry",
    "RemoteServerVirtualDevice",
    "RemoteServerVirtualDeviceSet",
)

_log = get_logger(__name__)

_U32 = 0xFFFFFFFF
_I64 = 1 << 63
#: Room for the descriptors one record may carry (SEGMENT: one); extras are closed.
_ANCILLARY = socket.CMSG_SPACE(4 * 4)
#: Records applied in a row before the reader lets other tasks run.
_BATCH = 64
_ERRORS: dict[HResult, type[VDIError]] = {
    HResult.PROTOCOL: VDProtocolError,
    HResult.ABORT: VDAbortError,
    HResult.OPEN: VDOpenError,
}


# --- the pieces of one connection ---------------------------------------------------


@dataclasses.dataclass(eq=False, slots=True)
class _Mapped:
    """One segment of the buffer area, mapped in this process."""

    index: int
    map: mmap.mmap
    view: memoryview
    base: int
    length: int

    def close(self) -> None:
        self.view.release()
        try:
            self.map.close()
        except BufferError:
            pass  # a view exported elsewhere keeps the pages until it is released


@dataclasses.dataclass(eq=False, slots=True)
class _Buffer:
    """A buffer the client allocated for us: where it is, and the view we handed out."""

    segment: _Mapped
    offset: int
    size: int
    view: memoryview
    address: int
    pending: int = 0  # commands sent with it and not completed


@dataclasses.dataclass(eq=False, slots=True)
class _Request:
    """A record that gets a REPLY, until the reply came and its waiter took it."""

    id: int
    call: ServerCall
    size: int = 0  # ALLOCATE_BUFFER: the size asked for
    device: RemoteServerVirtualDevice | None = None  # CLOSE_DEVICE
    name: str = ""  # OPEN_DEVICE
    reply: wire.Reply | None = None
    value: object = None  # what the reply made: a device, a buffer
    abandoned: bool = False
    notifier: Notifier = dataclasses.field(default_factory=Notifier)


class _Connection:
    """The state of one opened set: everything the reader applies, the calls read."""

    def __init__(
        self,
        sock: socket.socket,
        instance: str | None,
        name: str,
        send_message: Callable[[_Connection, bytes], None],
    ) -> None:
        self.sock = sock
        self.instance = instance
        self.name = name
        self.state = ServerState.DNE  # CONNECTED once welcomed
        self.config: VDConfig | None = None
        self.final_config: VDConfig | None = None
        self.client_pid = 0
        self.job = ""
        self.refusal: VDIError | None = None
        self.aborted_by: SetAbortCause | None = None
        self.abort_reason: str | None = None
        self.lost = False  # the socket is gone (EOF, error, or we closed)
        self.closing = False  # our CLOSE was sent: the end of the connection is expected
        self.reset = False  # ECONNRESET was read: what the client sent last comes next
        self.segments: dict[int, _Mapped] = {}
        self.starts: list[int] = []  # addresses of the allocated buffers, sorted
        self.buffers: list[_Buffer] = []  # parallel to starts
        self.requests: dict[int, _Request] = {}
        self.commands: dict[int, RemotePendingCommand] = {}
        self.devices: dict[int, RemoteServerVirtualDevice] = {}
        self.outbox: deque[bytes] = deque()
        #: the records of one step of the loop, sent as one message by ``send_message``
        self.gatherer = Gatherer(lambda data: send_message(self, data))
        self.notifier = Notifier()  # welcome, state, abort, loss
        self.writable = Notifier()  # something waits in the outbox
        # Shielded: the connection lives until the set is closed (``_finish`` cancels
        # it), not until whoever waits on the set is cancelled: the way out of a
        # cancelled engine still sends SIGNAL_ABORT and CLOSE over it.
        self.scope = anyio.CancelScope(shield=True)
        self.finished = anyio.Event()
        self.serials = itertools.count(1)
        self._last_id = 0

    @property
    def aborted(self) -> bool:
        return self.aborted_by is not None

    def new_id(self) -> int:
        """A request or command id: never 0, never one still unanswered."""
        ident = self._last_id
        while True:
            ident = ident % _U32 + 1
            if ident not in self.requests and ident not in self.commands:
                self._last_id = ident
                return ident

    def error(
        self, cls: type[VDIError], message: str, device: str | None = None, state: object = None
    ) -> VDIError:
        return cls(
            message,
            set_name=self.name,
            device=device,
            state=(self.state.name if state is None else state),
        )

    def abort_error(self, what: str, device: str | None = None) -> VDIError:
        return self.error(
            VDAbortError,
            f"{what}: the set was aborted ({self.abort_reason})",
            device,
            "ABORTED",
        )

    def locate(self, view: object) -> tuple[_Buffer, int] | None:
        """The allocated buffer a writable view points into, and the view's offset in
        that buffer's segment."""
        if not isinstance(view, memoryview):
            return None
        address = address_of(view)
        if address is None:
            return None
        index = bisect.bisect_right(self.starts, address) - 1
        if index < 0:
            return None
        buffer = self.buffers[index]
        if address + view.nbytes > buffer.address + buffer.size:
            return None
        return buffer, address - buffer.segment.base

    def add_buffer(self, buffer: _Buffer) -> None:
        index = bisect.bisect(self.starts, buffer.address)
        self.starts.insert(index, buffer.address)
        self.buffers.insert(index, buffer)

    def remove_buffer(self, buffer: _Buffer) -> None:
        index = bisect.bisect_left(self.starts, buffer.address)
        while self.buffers[index] is not buffer:
            index += 1
        del self.starts[index]
        del self.buffers[index]

    def wake_all(self) -> None:
        for request in self.requests.values():
            request.notifier.notify_all()
        self.notifier.notify_all()

    def release_memory(self) -> None:
        for buffer in self.buffers:
            try:
                buffer.view.release()
            except BufferError:
                pass
        self.starts.clear()
        self.buffers.clear()
        for segment in self.segments.values():
            segment.close()
        self.segments.clear()


# --- commands -----------------------------------------------------------------------


class RemotePendingCommand:
    """A command sent to the client; await it (or ``wait``) for its ``CommandResult``.

    Completed by the connection's reader when the client's COMPLETION arrives, or at
    once with ``OPERATION_ABORTED`` when the set aborts (``PendingResult``).
    """

    __slots__ = (
        "_buffer",
        "_conn",
        "_notifier",
        "_result",
        "code",
        "device",
        "id",
        "position",
        "serial",
        "size",
    )

    def __init__(
        self,
        conn: _Connection,
        device: RemoteServerVirtualDevice,
        code: CommandCode,
        size: int,
        position: int,
    ) -> None:
        self._conn = conn
        self.device = device
        self.code = code
        self.size = size
        self.position = position
        self.serial = next(conn.serials)
        self.id = 0  # the wire id, once sent
        self._buffer: _Buffer | None = None
        self._result: CommandResult | None = None
        self._notifier = Notifier()

    def __repr__(self) -> str:
        state = f"done {self._result}" if self._result else "pending"
        return f"<RemotePendingCommand #{self.serial} {self.code.name} size={self.size} {state}>"

    def done(self) -> bool:
        return self._result is not None

    def result(self) -> CommandResult:
        """The result; ``RuntimeError`` if the command has not completed yet."""
        if self._result is None:
            raise RuntimeError(f"command #{self.serial} has not completed yet")
        return self._result

    async def wait(self, timeout: float | None = None) -> CommandResult:
        """The result, waiting at most ``timeout`` seconds (``VDTimeoutError`` after;
        ``None`` or negative: as long as it takes, ``0``: poll)."""
        await anyio.lowlevel.checkpoint_if_cancelled()
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        while self._result is None:
            if deadline is not None and time.monotonic() >= deadline:
                conn = self._conn
                raise conn.error(VDTimeoutError, "command result: timed out")
            await self._notifier.wait(deadline)
        return self._result

    def __await__(self) -> Generator[Any, None, CommandResult]:
        return self.wait().__await__()

    def _finish(self, result: CommandResult) -> None:
        if self._result is None:
            self._result = result
            if self._buffer is not None:
                self._buffer.pending -= 1
            self._notifier.notify_all()


class RemoteServerVirtualDevice:
    """One device of a remote set as the engine sees it (``ServerDevice``)."""

    def __init__(
        self, owner: RemoteServerVirtualDeviceSet, conn: _Connection, index: int, name: str
    ) -> None:
        self._owner = owner
        self._conn = conn
        self.index = index
        self._name = name
        self.closed = False  # close_device was called

    def __repr__(self) -> str:
        return f"<RemoteServerVirtualDevice {self._name!r} of {self._owner!r}>"

    @property
    def name(self) -> str:
        return self._name

    def _invalid(self, message: str) -> VDInvalidError:
        return VDInvalidError(message, set_name=self._conn.name, device=self._name)

    def send_command(
        self,
        code: int,
        size: int = 0,
        position: int = 0,
        buffer: memoryview | None = None,
    ) -> RemotePendingCommand:
        """Send a command; await the returned object for its ``CommandResult``.

        Never blocks. Refusals the set decides here (closed set, aborted set, wrong
        state, device closed) complete the command at once, as in-process; the rest
        (the I/O-error state, a full queue) the client decides and completes."""
        conn = self._conn
        try:
            code = CommandCode(code)
        except ValueError:
            raise self._invalid(f"send_command: unknown command code {code!r}") from None
        if (
            not isinstance(size, int)
            or not isinstance(position, int)
            or not (-_I64 <= position < _I64 and 0 <= size <= _U32)
        ):
            raise self._invalid(
                f"send_command: size={size!r} and position={position!r} out of range"
            )
        found: tuple[_Buffer, int] | None = None
        if code in BUFFER_COMMANDS:
            found = conn.locate(buffer)
            if found is None:
                raise self._invalid(
                    f"send_command: {code.name} needs a buffer allocated from this set"
                )
            assert buffer is not None
            if size > buffer.nbytes:
                raise self._invalid(
                    f"send_command: size={size} exceeds the buffer's {buffer.nbytes} bytes"
                )
        pending = RemotePendingCommand(conn, self, code, size, position)
        refusal = self._refusal(conn)
        if refusal is not None:
            pending._finish(CommandResult(refusal))
            return pending
        ident = pending.id = conn.new_id()
        conn.commands[ident] = pending
        segment, offset = wire.NO_SEGMENT, 0
        if found is not None:
            held, offset = found
            held.pending += 1
            pending._buffer = held
            segment = held.segment.index
        self._owner._send(
            conn, wire.SendCommand(ident, self.index, code, size, position, segment, offset)
        )
        return pending

    def _refusal(self, conn: _Connection) -> Completion | None:
        if self._owner._conn is not conn:
            return Completion.INVALID_HANDLE
        outcome = server_transition(conn.state, ServerCall.SEND_COMMAND)
        if outcome.result is HResult.ABORT:
            return Completion.OPERATION_ABORTED
        if not outcome.ok or self.closed:
            return Completion.INVALID_HANDLE
        return None

    async def close_device(self) -> None:
        """End this device's stream: the client gets every earlier command, then a close.

        Returns once the client applied it; after an abort it does nothing."""
        owner, conn = self._owner, self._conn
        if owner._conn is not conn:
            raise VDProtocolError(
                "close_device: this device's set was closed",
                set_name=conn.name,
                device=self._name,
                state="DNE",
            )
        owner._enter(conn, ServerCall.CLOSE_DEVICE, self._name)
        if conn.aborted:
            return  # decision 5
        if self.closed:
            raise conn.error(
                VDClosedError, "close_device: the device is already closed", self._name
            )
        self.closed = True  # later commands are refused at once, as in-process
        await owner._request(
            conn,
            _Request(conn.new_id(), ServerCall.CLOSE_DEVICE, device=self),
            lambda ident: wire.CloseDevice(ident, self.index),
        )


# --- the set --------------------------------------------------------------------------


class RemoteServerVirtualDeviceSet:
    """The engine's handle on a set a client in another process serves (module doc).

    Use it inside ``async with``: the block owns the connection's reader task; leaving
    it with an exception signals abort, and closes the set if it is still open.
    """

    #: Bound on the wait for any reply but ALLOCATE_BUFFER's (seconds).
    reply_timeout: float = 60.0
    #: Bound on close's wait for the client's last reply (seconds).
    close_timeout: float = 5.0

    def __init__(self, *, directory: RuntimeDirectory | None = None) -> None:
        self._directory = directory
        self._conn: _Connection | None = None
        self._group: anyio.abc.TaskGroup | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._opening = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {self.state.name}>"

    # --- views of the state ------------------------------------------------------

    @property
    def state(self) -> ServerState:
        return self._conn.state if self._conn is not None else ServerState.DNE

    @property
    def name(self) -> str | None:
        return self._conn.name if self._conn is not None else None

    @property
    def abort_reason(self) -> str | None:
        """Why the set aborted, in words; ``None`` while it has not."""
        return self._conn.abort_reason if self._conn is not None else None

    @property
    def aborted_by(self) -> SetAbortCause | None:
        """Why the set aborted, as a ``SetAbortCause``; ``None`` while it has not."""
        return self._conn.aborted_by if self._conn is not None else None

    @property
    def configuration(self) -> VDConfig | None:
        """The final configuration once ``end_configuration`` ran."""
        return self._conn.final_config if self._conn is not None else None

    @property
    def client_pid(self) -> int | None:
        """The pid of the client process (from its WELCOME) while a set is open."""
        return self._conn.client_pid if self._conn is not None else None

    @property
    def job(self) -> str | None:
        """The client's job label (its WELCOME's) while a set is open."""
        return self._conn.job if self._conn is not None else None

    # --- async with ----------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._stack is not None:
            raise RuntimeError(f"{self!r} is already entered")
        stack = contextlib.AsyncExitStack()
        self._group = await stack.enter_async_context(anyio.create_task_group())
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        group, stack = self._group, self._stack
        assert group is not None, "__aexit__ without __aenter__"
        assert stack is not None
        try:
            if self._conn is not None:
                if exc is not None and not self._conn.aborted:
                    self.signal_abort()
                with anyio.CancelScope(shield=True):
                    await self.close()
        finally:
            self._group = self._stack = None
            group.cancel_scope.cancel()  # nothing of ours should be left; be sure
            # The group gets none of the caller's exception: it must neither swallow
            # the caller's cancellation nor wrap the caller's error.
            await stack.__aexit__(None, None, None)

    # --- checks --------------------------------------------------------------------

    def _require_open(self, what: str) -> _Connection:
        if self._conn is None:
            raise VDProtocolError(f"{what}: no set is open on this object", state="DNE")
        return self._conn

    def _enter(self, conn: _Connection, call: ServerCall, device: str | None = None) -> _Connection:
        """Check ``call`` against the server's state table on the mirrored state."""
        outcome = server_transition(conn.state, call)
        if outcome.result is HResult.ABORT:
            raise conn.abort_error(call.value, device)
        if not outcome.ok:
            raise conn.error(_ERRORS[outcome.result], f"{call.value} is not allowed now", device)
        return conn

    def _call(self, call: ServerCall) -> _Connection:
        return self._enter(self._require_open(call.value), call)

    # --- opening -------------------------------------------------------------------

    async def open(self, instance: str | None, name: str, timeout: float | None = 10.0) -> None:
        """Open the set ``name`` another process published; wait (``timeout`` seconds)
        for its WELCOME. ``VDInvalidError`` when no such set is published, the
        client's refusal (``VDSecurityError``, ...) when it refuses this process."""
        if self._conn is not None or self._opening:
            raise VDProtocolError(
                "open: a set is already open on this object",
                set_name=self.name,
                state=self.state.name,
            )
        if self._group is None:
            raise VDProtocolError(
                "open: the set object must be used inside `async with` (it owns the "
                "connection's reader task)",
                set_name=name if isinstance(name, str) else None,
            )
        directory = self._directory if self._directory is not None else RuntimeDirectory()
        self._opening = True
        try:
            # A quick local call (a full backlog fails at once: the socket has a timeout).
            sock = directory.connect(instance, name)
            try:
                sock.setblocking(False)
            except BaseException:
                sock.close()
                raise
            conn = _Connection(sock, instance, name, self._send_message)
            self._group.start_soon(self._serve, conn, name=f"vdistream set {name!r} reader")
            try:
                await self._await_welcome(conn, timeout)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._finish(conn)
                raise
        finally:
            self._opening = False
        self._conn = conn
        _log.debug("remote_set_opened", set_name=name, client_pid=conn.client_pid, job=conn.job)

    async def _await_welcome(self, conn: _Connection, timeout: float | None) -> None:
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        while conn.config is None:
            if conn.refusal is not None:
                raise conn.refusal
            if conn.lost:
                raise VDInvalidError(
                    "open: the client closed the connection before it welcomed this engine",
                    set_name=conn.name,
                )
            if deadline is not None and time.monotonic() >= deadline:
                raise VDTimeoutError(
                    f"open: the client sent no welcome within {timeout} s", set_name=conn.name
                )
            await conn.notifier.wait(deadline)

    def get_configuration(self) -> VDConfig:
        """The client's configuration inputs (its WELCOME's)."""
        conn = self._call(ServerCall.GET_CONFIGURATION)
        assert conn.config is not None
        return conn.config

    # --- configuring ---------------------------------------------------------------

    async def begin_configuration(
        self,
        features: int,
        block_size: int,
        alignment: int,
        max_transfer_size: int,
        timeout: float | None = None,
        *,
        honour_complete: bool = True,
    ) -> None:
        conn = self._call(ServerCall.BEGIN_CONFIGURATION)
        values = {
            "features": features,
            "block_size": block_size,
            "alignment": alignment,
            "max_transfer_size": max_transfer_size,
        }
        problems = [
            f"{k}={v!r} is not a 32-bit unsigned integer" for k, v in values.items() if not _u32(v)
        ]
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0
        ):
            problems.append(f"timeout={timeout!r} is not a number of seconds")
        if problems:
            raise conn.error(VDInvalidError, "begin_configuration: " + "; ".join(problems))
        timeout_ms = (
            -1
            if timeout is None or not math.isfinite(timeout)
            else min(int(timeout * 1000), _I64 - 1)
        )
        await self._request(
            conn,
            _Request(conn.new_id(), ServerCall.BEGIN_CONFIGURATION),
            lambda ident: wire.BeginConfiguration(
                ident,
                features,
                block_size,
                alignment,
                max_transfer_size,
                timeout_ms,
                1 if honour_complete else 0,
            ),
        )

    async def request_buffers(self, size: int, alignment: int, count: int) -> None:
        """Declare ``count`` buffers of ``size`` data bytes (spec RequestBuffers)."""
        conn = self._call(ServerCall.REQUEST_BUFFERS)
        if not _u32(size) or size <= 0 or not _u32(count) or count <= 0:
            raise conn.error(
                VDInvalidError,
                f"request_buffers: size={size!r} and count={count!r} must be positive",
            )
        self._check_alignment(conn, "request_buffers", alignment)
        await self._request(
            conn,
            _Request(conn.new_id(), ServerCall.REQUEST_BUFFERS),
            lambda ident: wire.RequestBuffers(ident, size, alignment, count),
        )

    async def query_available_buffers(self, size: int, alignment: int = 0) -> int:
        """How many free buffers could satisfy ``allocate_buffer(size, alignment)`` now."""
        conn = self._call(ServerCall.QUERY_AVAILABLE_BUFFERS)
        self._check_alignment(conn, "query_available_buffers", alignment)
        if not _u32(size):
            return 0  # no buffer is that big
        reply = await self._request(
            conn,
            _Request(conn.new_id(), ServerCall.QUERY_AVAILABLE_BUFFERS),
            lambda ident: wire.QueryAvailableBuffers(ident, size, alignment),
        )
        return reply.value0

    async def end_configuration(self) -> None:
        """The client maps the buffer area (its SEGMENTs arrive first); its
        ``get_configuration`` returns now."""
        conn = self._call(ServerCall.END_CONFIGURATION)
        await self._request(
            conn,
            _Request(conn.new_id(), ServerCall.END_CONFIGURATION),
            lambda ident: wire.EndConfiguration(ident),
        )

    def _check_alignment(self, conn: _Connection, what: str, alignment: int) -> None:
        if alignment != 0 and (
            not isinstance(alignment, int)
            or not is_power_of_two(alignment)
            or alignment > ALIGNMENT_MAX
        ):
            raise conn.error(
                VDInvalidError,
                f"{what}: alignment={alignment!r} is not a power of two up to 64 KiB",
            )

    # --- devices -------------------------------------------------------------------

    async def open_device(self, name: str) -> RemoteServerVirtualDevice:
        conn = self._call(ServerCall.OPEN_DEVICE)
        if not isinstance(name, str) or not name or "\\" in name:
            raise VDInvalidError(f"open_device: bad device name {name!r}", set_name=conn.name)
        if len(name.encode("utf-8", "surrogatepass")) > wire.MAX_RECORD - wire.HEADER.size:
            raise VDInvalidError(f"open_device: the set has no device {name!r}", set_name=conn.name)
        request = _Request(conn.new_id(), ServerCall.OPEN_DEVICE, name=name)
        await self._request(conn, request, lambda ident: wire.OpenDevice(ident, name))
        assert isinstance(request.value, RemoteServerVirtualDevice)
        return request.value

    async def wait_active(self, timeout: float | None = None) -> None:
        """Return once both sides opened every device (a convenience beyond the spec)."""
        conn = self._require_open("wait_active")
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        await anyio.lowlevel.checkpoint_if_cancelled()
        while True:
            self._check_live(conn, "wait_active")
            if conn.state in (ServerState.ACTIVE, ServerState.NORMALLY_TERMINATED):
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise conn.error(VDTimeoutError, "wait_active: timed out")
            await conn.notifier.wait(deadline)

    def _check_live(self, conn: _Connection, what: str, device: str | None = None) -> None:
        if conn.aborted:
            raise conn.abort_error(what, device)
        if self._conn is not conn:
            raise VDProtocolError(f"{what}: the set was closed", set_name=conn.name, device=device)

    # --- buffers -------------------------------------------------------------------

    async def allocate_buffer(self, size: int, alignment: int = 0) -> memoryview:
        """A writable view of ``size`` bytes of the shared buffer area; waits for a free
        buffer as long as the set lives (cancellable)."""
        conn = self._call(ServerCall.ALLOCATE_BUFFER)
        self._check_alignment(conn, "allocate_buffer", alignment)
        if not isinstance(size, int) or size <= 0:
            raise conn.error(VDInvalidError, f"allocate_buffer: size={size!r} must be positive")
        if size > _U32:
            raise conn.error(
                VDMemoryError, f"allocate_buffer: no buffer of {size} bytes was requested"
            )
        request = _Request(conn.new_id(), ServerCall.ALLOCATE_BUFFER, size=size)
        await self._request(
            conn, request, lambda ident: wire.AllocateBuffer(ident, size, alignment), timeout=None
        )
        assert isinstance(request.value, _Buffer)
        return request.value.view

    def free_buffer(self, buffer: memoryview) -> None:
        """Give a buffer back (never blocks); after an abort this does nothing."""
        conn = self._call(ServerCall.FREE_BUFFER)
        if conn.aborted:
            return  # decision 5: close releases everything
        found = conn.locate(buffer)
        if found is None:
            raise conn.error(VDInvalidError, "free_buffer: not a buffer allocated from this set")
        held = found[0]
        if held.pending:
            raise conn.error(
                VDInvalidError, "free_buffer: an outstanding command still uses this buffer"
            )
        self._give_back(conn, held)

    def _give_back(self, conn: _Connection, held: _Buffer) -> None:
        conn.remove_buffer(held)
        try:
            held.view.release()
        except BufferError:
            pass  # exported elsewhere: the export keeps the memory alive
        self._send(conn, wire.FreeBuffer(held.segment.index, held.offset))

    def is_shared_buffer(self, buffer: object) -> bool:
        """Whether ``buffer`` is a writable view into the set's buffer area."""
        conn = self._conn
        if conn is None or not isinstance(buffer, memoryview):
            return False
        address = address_of(buffer)
        if address is None:
            return False
        return any(
            m.base <= address and address + buffer.nbytes <= m.base + m.length
            for m in conn.segments.values()
        )

    # --- abort and close -----------------------------------------------------------

    def signal_abort(self) -> None:
        """Abort the set at once on this side, then tell the client; idempotent."""
        conn = self._call(ServerCall.SIGNAL_ABORT)
        if conn.aborted:
            return
        self._abort(conn, SetAbortCause.SERVER, "the server signalled abort")
        self._send(conn, wire.SignalAbort())

    async def close(self) -> None:
        """Release the set (decision 4 of api.md).

        After an abort, or once every device was closed with ``close_device``, this
        returns ``None``; otherwise the set is aborted, released, and then
        ``VDProtocolError`` is raised. Sends CLOSE and waits (at most
        ``close_timeout``) for the client's reply, then releases the mappings."""
        conn = self._call(ServerCall.CLOSE)
        premature = not conn.aborted and conn.state is not ServerState.NORMALLY_TERMINATED
        if premature:
            # The client's own close of a set not terminated aborts it with this reason.
            self._abort(
                conn,
                SetAbortCause.SERVER,
                "the server closed the set before every device was closed",
            )
        try:
            if not conn.lost:
                request = _Request(conn.new_id(), ServerCall.CLOSE)
                conn.closing = True
                try:
                    await self._request(
                        conn, request, lambda ident: wire.Close(ident), timeout=self.close_timeout
                    )
                except VDIError:
                    pass  # the client refused or never answered: we are gone either way
        finally:
            self._conn = None
            conn.state = ServerState.DNE
            conn.wake_all()
            with anyio.CancelScope(shield=True):
                await self._finish(conn)
            _log.debug("remote_set_closed", set_name=conn.name, aborted=conn.abort_reason)
        if premature:
            raise VDProtocolError(
                "close: devices were still open; the set was aborted and released",
                set_name=conn.name,
                state="ACTIVE",
            )

    async def _finish(self, conn: _Connection) -> None:
        """End the connection's task (it closes the socket) and unmap the area. A
        command still outstanding (the client held it when the engine closed the set)
        can get no COMPLETION any more: it completes with OPERATION_ABORTED."""
        conn.closing = True
        conn.scope.cancel()
        await conn.finished.wait()
        commands = list(conn.commands.values())
        conn.commands.clear()
        for pending in commands:
            pending._finish(CommandResult(Completion.OPERATION_ABORTED))
        conn.release_memory()

    # --- requests --------------------------------------------------------------------

    async def _request(
        self,
        conn: _Connection,
        request: _Request,
        record: Callable[[int], Any],
        *,
        timeout: float | bool | None = True,
    ) -> wire.Reply:
        """Send ``record(id)`` and wait for its REPLY (``timeout``: True is
        ``reply_timeout``); the reply's error raised as the client raised it."""
        if timeout is True:
            timeout = self.reply_timeout
        assert not isinstance(timeout, bool)
        what = request.call.value
        conn.requests[request.id] = request
        self._send(conn, record(request.id))
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            await anyio.lowlevel.checkpoint_if_cancelled()
            while request.reply is None:
                if request.call is ServerCall.CLOSE:
                    if conn.lost:
                        raise conn.error(VDAbortError, "close: the connection is gone")
                elif conn.aborted:
                    if request.call is ServerCall.CLOSE_DEVICE:
                        return wire.Reply(request.id, 0, 0)  # decision 5
                    device = request.device.name if request.device is not None else None
                    raise conn.abort_error(what, device)
                elif self._conn is not conn:
                    raise VDProtocolError(f"{what}: the set was closed", set_name=conn.name)
                if deadline is not None and time.monotonic() >= deadline:
                    raise conn.error(
                        VDTimeoutError, f"{what}: the client sent no reply within {timeout} s"
                    )
                await request.notifier.wait(deadline)
        except BaseException:
            request.abandoned = True
            if request.reply is not None:
                self._undo(conn, request)  # answered meanwhile: nobody takes what it made
            raise
        reply = request.reply
        if reply.hresult != HResult.NOERROR:
            raise self._reply_error(conn, reply, what, request)
        return reply

    def _reply_error(
        self, conn: _Connection, reply: wire.Reply, what: str, request: _Request
    ) -> VDIError:
        """The client's error for a request: the same ``VDIError`` subclass and message
        (the client sends it without the set, device and state, which we add again)."""
        message = reply.message or f"{what} failed"
        device = request.device.name if request.device is not None else None
        try:
            state: object = wire.state_from_code(reply.state).name
        except wire.WireError:
            state = conn.state.name
        return VDIError.from_hresult(
            reply.hresult, message, set_name=conn.name, device=device, state=state
        )

    def _undo(self, conn: _Connection, request: _Request) -> None:
        """A reply whose caller stopped waiting: give back what it allocated."""
        value, request.value = request.value, None
        if isinstance(value, _Buffer) and not conn.aborted and not conn.lost:
            self._give_back(conn, value)

    # --- sending ---------------------------------------------------------------------

    def _send(self, conn: _Connection, record: Any) -> None:
        """Send one record, never blocking, with the others of this step of the loop
        (``Gatherer``). A connection already lost takes nothing (the abort says what
        happened)."""
        if conn.lost:
            return
        conn.gatherer.add(record.encode())

    def _send_message(self, conn: _Connection, data: bytes) -> None:
        """Send one message, or queue it for the connection's task when the socket is
        full (after what is queued already)."""
        if conn.lost:
            return
        if not conn.outbox:
            try:
                conn.sock.send(data, socket.MSG_NOSIGNAL)
                return
            except BlockingIOError:
                pass
            except OSError as exc:
                self._lost(conn, exc)
                return
        conn.outbox.append(data)
        conn.writable.notify_all()

    # --- the connection's task ---------------------------------------------------------

    async def _serve(self, conn: _Connection) -> None:
        """Read and apply every record; write what waits in the outbox. Owns the
        socket: closes it when it ends (cancelled by ``_finish``)."""
        try:
            with conn.scope:
                async with anyio.create_task_group() as group:
                    group.start_soon(self._write, conn)
                    await self._read(conn)
                    group.cancel_scope.cancel()
        except Exception as exc:  # a bug of ours must not kill the engine's task group
            _log.exception("remote_set_reader_failed", set_name=conn.name)
            self._lost(conn, exc)
        finally:
            conn.gatherer.flush()  # a last SIGNAL_ABORT or CLOSE gathered this step
            self._lost(conn, None)
            conn.outbox.clear()
            conn.sock.close()
            conn.finished.set()

    async def _write(self, conn: _Connection) -> None:
        sock = conn.sock
        while not conn.lost:
            if not conn.outbox:
                await conn.writable.wait(None)
                continue
            await anyio.wait_writable(sock)
            while conn.outbox and not conn.lost:
                try:
                    sock.send(conn.outbox[0], socket.MSG_NOSIGNAL)
                except BlockingIOError:
                    break
                except OSError as exc:
                    self._lost(conn, exc)
                    return
                conn.outbox.popleft()

    async def _read(self, conn: _Connection) -> None:
        """Apply every record until the connection ends.

        On asyncio the socket gets one reader callback for the connection's whole life,
        which applies records as soon as the loop sees them: no task wakes up per record
        and no epoll registration is made and undone per record (what a wait per record
        costs shows in the round trip of every command). This task only holds the
        callback's lifetime. Elsewhere (trio) it waits for each batch itself.
        """
        try:
            loop = asyncio.get_running_loop()
            task = asyncio.current_task()
        except RuntimeError:
            loop, task = None, None
        if loop is None or task is None:
            while not conn.lost:
                self._drain(conn)
                if not conn.lost:
                    await anyio.wait_readable(conn.sock)
            return
        ended: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            self._drain(conn)
            if conn.lost and not ended.done():
                ended.set_result(None)

        fd = conn.sock.fileno()
        loop.add_reader(fd, readable)
        try:
            readable()  # what arrived before the callback was in place
            await ended
        finally:
            loop.remove_reader(fd)

    def _drain(self, conn: _Connection) -> None:
        """Apply the records waiting on the socket, at most ``_BATCH`` (the rest on the
        next call: other tasks get their turn)."""
        sock = conn.sock
        for _ in range(_BATCH):
            if conn.lost:
                return
            try:
                # A longer message is cut and flagged MSG_TRUNC: a violation.
                data, ancillary, flags, _ = sock.recvmsg(
                    wire.MAX_MESSAGE, _ANCILLARY, socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                return
            except ConnectionResetError as exc:
                # The client closed with records of ours unread: the kernel says so once,
                # before the records the client sent last (its STATE, its last REPLY),
                # which are still to be read, then EOF.
                if conn.reset:
                    self._lost(conn, exc)
                    return
                conn.reset = True
                continue
            except OSError as exc:
                self._lost(conn, exc)
                return
            fds = received_fds(ancillary)
            if not data and not fds:
                self._lost(conn, None)  # EOF: the client closed, or its process died
                return
            try:
                self._apply(conn, data, fds, flags)
            except Exception as exc:  # a bug of ours: the connection cannot go on
                _log.exception("remote_set_reader_failed", set_name=conn.name)
                self._lost(conn, exc)
            finally:
                for fd in fds:
                    os.close(fd)

    def _lost(self, conn: _Connection, why: BaseException | None) -> None:
        if conn.lost:
            return
        conn.lost = True
        conn.outbox.clear()
        conn.gatherer.clear()
        if not conn.closing and conn.state is not ServerState.DNE:
            detail = f": {why}" if why is not None else ""
            self._abort(
                conn,
                SetAbortCause.PROCESS_DEATH,
                f"the client process died (the connection to it was lost{detail})",
            )
        conn.wake_all()

    def _abort(self, conn: _Connection, cause: SetAbortCause, reason: str) -> None:
        """Put this side in the abort state at once (spec §5.1)."""
        if conn.aborted:
            return
        conn.aborted_by, conn.abort_reason = cause, reason
        conn.state = server_event(conn.state, SetEvent.ABORTED)
        aborted = CommandResult(Completion.OPERATION_ABORTED)
        commands = list(conn.commands.values())
        conn.commands.clear()
        for pending in commands:
            pending._finish(aborted)
        conn.wake_all()
        _log.info("remote_set_aborted", set_name=conn.name, cause=cause.value, reason=reason)

    def _violation(self, conn: _Connection, what: str) -> None:
        """The client broke the protocol: abort, tell it, stop reading."""
        if not conn.aborted and conn.state is not ServerState.DNE:
            self._abort(conn, SetAbortCause.SERVER, f"protocol violation by the client: {what}")
            self._send(conn, wire.SignalAbort())
            conn.gatherer.flush()  # now: the connection ends below
        elif conn.config is None:
            conn.refusal = VDProtocolError(
                f"open: the client broke the protocol: {what}", set_name=conn.name
            )
        self._lost(conn, None)

    # --- applying records --------------------------------------------------------------

    def _apply(self, conn: _Connection, data: bytes, fds: list[int], flags: int) -> None:
        """Apply the records of one message, in order."""
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            self._violation(
                conn,
                f"a message longer than {wire.MAX_MESSAGE} bytes or with too many descriptors",
            )
            return
        try:
            records = wire.decode_message(data)
        except wire.WireError as exc:
            self._violation(conn, str(exc))
            return
        if fds and (len(records) != 1 or not isinstance(records[0], wire.Segment)):
            self._violation(conn, "file descriptors came with a message that is not one SEGMENT")
            return
        for record in records:
            if conn.lost:
                return
            self._apply_record(conn, record, fds)

    def _apply_record(self, conn: _Connection, record: wire.Record, fds: list[int]) -> None:
        if conn.config is None and not isinstance(record, wire.Welcome | wire.Refused):
            self._violation(conn, f"a {type(record).__name__} record before the WELCOME")
            return
        try:
            match record:
                case wire.CompletionRecord():
                    self._on_completion(conn, record)
                case wire.Reply():
                    self._on_reply(conn, record)
                case wire.StateRecord():
                    self._on_state(conn, record)
                case wire.Segment():
                    self._on_segment(conn, record, fds)
                case wire.Welcome():
                    self._on_welcome(conn, record)
                case wire.Refused():
                    conn.refusal = VDIError.from_hresult(
                        record.hresult, f"open: refused: {record.message}", set_name=conn.name
                    )
                    conn.notifier.notify_all()
                case _:
                    self._violation(conn, f"{type(record).__name__} is an engine's record")
        except wire.WireError as exc:
            self._violation(conn, str(exc))

    def _on_welcome(self, conn: _Connection, record: wire.Welcome) -> None:
        if conn.config is not None:
            self._violation(conn, "a second WELCOME")
            return
        if record.version != wire.VERSION:
            conn.refusal = VDProtocolError(
                f"open: the client speaks version {record.version} of the set transport, "
                f"this engine version {wire.VERSION}",
                set_name=conn.name,
            )
            self._lost(conn, None)
            return
        conn.config = record.config
        conn.client_pid = record.client_pid
        conn.job = record.job
        conn.state = ServerState.CONNECTED
        conn.notifier.notify_all()

    def _on_completion(self, conn: _Connection, record: wire.CompletionRecord) -> None:
        pending = conn.commands.pop(record.id, None)
        if pending is None:
            if not conn.aborted:  # after an abort, the client's own OPERATION_ABORTED
                self._violation(conn, f"a COMPLETION for command id {record.id}, not outstanding")
            return
        if record.device != pending.device.index:
            self._violation(
                conn,
                f"the COMPLETION of command id {record.id} names device {record.device}, "
                f"sent to device {pending.device.index}",
            )
            return
        pending._finish(CommandResult(record.completion, record.bytes_transferred, record.position))

    def _on_state(self, conn: _Connection, record: wire.StateRecord) -> None:
        state = wire.state_from_code(record.state)
        cause = wire.cause_from_code(record.cause)
        if state is ServerState.ABORTED:
            self._abort(conn, cause or SetAbortCause.CLIENT, record.reason or "the client aborted")
        else:
            self._mirror(conn, state)

    def _mirror(self, conn: _Connection, state: ServerState) -> None:
        """The client's view of our state; an abort is ours to apply (with its reason),
        and DNE comes from our own close."""
        if conn.aborted or state in (ServerState.DNE, ServerState.ABORTED):
            return
        if conn.state is not state:
            conn.state = state
            conn.notifier.notify_all()

    def _on_segment(self, conn: _Connection, record: wire.Segment, fds: list[int]) -> None:
        if len(fds) != 1:
            self._violation(conn, f"a SEGMENT record carried {len(fds)} descriptors, not 1")
            return
        if record.index in conn.segments:
            self._violation(conn, f"segment {record.index} was sent twice")
            return
        try:
            seals = fcntl.fcntl(fds[0], fcntl.F_GET_SEALS)
        except OSError:
            seals = 0  # not a memfd
        if ~seals & (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW):
            # Unsealed, the client could shrink the file under our mapping: our next
            # touch of a buffer would fault (SIGBUS) and kill this process.
            self._violation(conn, f"segment {record.index} is not a memfd sealed against resizing")
            return
        try:
            # At a 64 KiB boundary, as the client maps it: its aligned offsets are
            # aligned addresses here too. A length beyond the file's is refused.
            mapping, view = map_aligned(fds[0], record.length)
        except (OSError, ValueError, OverflowError) as exc:
            self._violation(conn, f"segment {record.index} of {record.length} bytes: {exc}")
            return
        conn.segments[record.index] = _Mapped(
            record.index, mapping, view, address_of(view) or 0, record.length
        )

    def _on_reply(self, conn: _Connection, record: wire.Reply) -> None:
        request = conn.requests.pop(record.id, None)
        if request is None:
            self._violation(conn, f"a REPLY for request id {record.id}, not outstanding")
            return
        try:
            self._mirror(conn, wire.state_from_code(record.state))
            if record.hresult == HResult.NOERROR:
                request.value = self._made(conn, request, record)
        except BaseException:
            # A reply we cannot apply (a violation, raised on): the set aborts, and
            # its waiter, no longer among the requests, must still wake to see that.
            conn.requests[record.id] = request
            raise
        request.reply = record
        if request.abandoned:
            self._undo(conn, request)
        request.notifier.notify_all()
        conn.notifier.notify_all()

    def _made(self, conn: _Connection, request: _Request, record: wire.Reply) -> object:
        """What a successful reply makes on this side."""
        match request.call:
            case ServerCall.END_CONFIGURATION:
                try:
                    conn.final_config = VDConfig.unpack(record.data)
                except Exception as exc:  # VDConfig.unpack's own complaint
                    raise wire.WireError(f"REPLY to END_CONFIGURATION: {exc}") from None
            case ServerCall.OPEN_DEVICE:
                index = record.value0
                device = conn.devices.get(index)
                if device is None:
                    device = RemoteServerVirtualDevice(self, conn, index, request.name)
                    conn.devices[index] = device
                return device
            case ServerCall.ALLOCATE_BUFFER:
                segment = conn.segments.get(record.value0)
                offset, size = record.value1, request.size
                if segment is None or offset + size > segment.length:
                    raise wire.WireError(
                        f"REPLY to ALLOCATE_BUFFER names segment {record.value0} offset "
                        f"{offset}, outside the buffer area"
                    )
                view = segment.view[offset : offset + size]
                held = _Buffer(segment, offset, size, view, segment.base + offset)
                conn.add_buffer(held)
                return held
        return None


# --- the registry -------------------------------------------------------------------


class RemoteRegistry(Registry):
    """A registry whose ``server_set()`` opens sets other processes publish in
    ``directory`` (default: ``RuntimeDirectory()``): run any engine over it."""

    def __init__(self, directory: RuntimeDirectory | None = None) -> None:
        super().__init__()
        self.directory = directory

    # The base's return type is the in-process class (the host drives its sync calls);
    # both satisfy ``vdistream.vdi.contract.ServerSet``, which is what engines use.
    def server_set(self) -> RemoteServerVirtualDeviceSet:  # type: ignore[override]
        return RemoteServerVirtualDeviceSet(directory=self.directory)


# --- helpers ------------------------------------------------------------------------


def _u32(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _U32
