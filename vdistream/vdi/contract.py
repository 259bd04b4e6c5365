"""Both sides of a set as their users see them: small Protocols, and ``settle``.

The client side (``ClientSet``, ``ClientDevice``): our own
:class:`~vdistream.vdi.ClientVirtualDeviceSet` satisfies them, and so does SQL Server's
through ``libsqlvdi.so`` (``vdistream.sqlserver.SqlVdiDeviceSet``): an engine says which
one its job must create (``Engine.client_set``), and the coordinator and the pumps run
unchanged over either.

The server side (``ServerSet``, ``ServerDevice``, ``PendingResult``): the in-process
:class:`~vdistream.vdi.ServerVirtualDeviceSet` satisfies them, and so does
``vdistream.transport.engine.RemoteServerVirtualDeviceSet``, the engine's side of a set
another process serves. A call that must wait for that other process is a coroutine
there and a plain call in-process, so the Protocol gives it the return type
``X | Awaitable[X]``: callers ``await settle(sds.call(...))`` and run over either.
Calls that never wait for the other process (``send_command``, ``free_buffer``,
``signal_abort``, ``get_configuration``) are plain on both sides and never block.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Generator
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar

from vdistream.protocol import (
    ClientState,
    Command,
    CommandCode,
    CommandResult,
    ServerState,
    SetAbortCause,
    VDConfig,
)
from vdistream.vdi.core import SetStatistics

__all__ = (
    "ClientDevice",
    "ClientSet",
    "PendingResult",
    "ServerDevice",
    "ServerSet",
    "settle",
)

T = TypeVar("T")


async def settle(value: T | Awaitable[T]) -> T:
    """``value``, awaited first when it is awaitable (a server call that may wait).

    Never pass it a ``PendingResult``: those are awaitable on purpose (their result).
    """
    if inspect.isawaitable(value):
        return await value
    return value


class ClientDevice(Protocol):
    """The client calls of one virtual device: all a pump needs of it.

    ``vdistream.vdi.ClientVirtualDevice`` offers them; so can SQL Server's VDI client
    devices (through ctypes) and devices served from another process. The contract is
    api.md's:

    * ``name``: the device's name, for logs.
    * ``await get_command(timeout)``: the next command in stream order, ``None`` waiting
      as long as the set lives. Raises ``VDClosedError`` once the server closed the
      device (the normal end) and ``VDAbortError`` once the set is aborted.
    * ``complete_command(command, completion, bytes_transferred, position)``: hand the
      same command object back with a Win32 completion code; its buffer belongs to the
      server again. Raises ``VDAbortError`` after an abort (the set is gone).

    Neither call may block the event loop; a command's ``buffer`` stays valid until it
    is completed or the set is closed. ``get_command(None)`` must end promptly when the
    pump is cancelled (the drain deadline relies on it: the pump does not poll), and
    must raise ``VDAbortError`` when the set's own server-timeout watchdog fires.
    """

    @property
    def name(self) -> str: ...

    async def get_command(self, timeout: float | None = None) -> Command: ...

    def complete_command(
        self, command: Command, completion: int, bytes_transferred: int = 0, position: int = 0
    ) -> None: ...


class ClientSet(Protocol):
    """The client calls of one virtual device set: all a job needs of it.

    * ``create(name, config)``: create the set under ``name`` with the client's part of
      the configuration (device count, features, server timeout); does not block.
    * ``await get_configuration(timeout)``: the server's final configuration (seconds;
      ``None`` waits as long as the set lives); ``VDTimeoutError`` when it passes,
      ``VDAbortError`` once the set is aborted. Cancellation ends it promptly.
    * ``open_device(name)``: the device the server opened under ``name``.
    * ``signal_abort(reason=None)``: abort the whole set at once; idempotent; never
      blocks; ``reason`` (the job's own words) follows "the client signalled abort".
    * ``close()``: release the set, after every call on it returned; ``VDOpenError``
      when devices were still open (the set is aborted and released anyway).
    * ``state``: the client's view (``ClientState``), ``DNE`` before create and after
      close; ``aborted_by``/``abort_reason``: who aborted the set and why, once it is.
    * ``statistics()``: buffers and commands outstanding per device, now.
    """

    @property
    def state(self) -> ClientState: ...

    @property
    def aborted_by(self) -> SetAbortCause | None: ...

    @property
    def abort_reason(self) -> str | None: ...

    def create(self, name: str, config: VDConfig) -> None: ...

    async def get_configuration(self, timeout: float | None = None) -> VDConfig: ...

    def open_device(self, name: str) -> ClientDevice: ...

    def signal_abort(self, reason: str | None = None) -> None: ...

    def close(self) -> None: ...

    def statistics(self) -> SetStatistics: ...


class PendingResult(Protocol):
    """A command the server sent (``ServerDevice.send_command``): await it, or call
    ``wait(timeout)``, for its ``CommandResult``.

    ``done()`` tells whether it completed; ``result()`` is the result once it has
    (``RuntimeError`` before). ``wait`` raises ``VDTimeoutError`` when ``timeout``
    passes (the command stays outstanding); it never raises ``VDAbortError``: an
    aborted set completes every outstanding command with ``OPERATION_ABORTED``.
    ``serial`` is unique among the set's commands.
    """

    @property
    def code(self) -> CommandCode: ...

    @property
    def size(self) -> int: ...

    @property
    def position(self) -> int: ...

    @property
    def serial(self) -> int: ...

    def done(self) -> bool: ...

    def result(self) -> CommandResult: ...

    async def wait(self, timeout: float | None = None) -> CommandResult: ...

    def __await__(self) -> Generator[Any, None, CommandResult]: ...


class ServerDevice(Protocol):
    """The server calls of one virtual device (api.md).

    * ``send_command(code, size, position, buffer)``: queue a command, never blocks; a
      command the set refuses (device closed, set aborted, queue full) completes at
      once with the refusal's completion code. ``VDInvalidError`` for an unknown code,
      a READ/WRITE without a buffer of this set, or a size beyond the buffer.
    * ``close_device()``: end the device's stream (awaitable when the set is served by
      another process).
    """

    @property
    def name(self) -> str: ...

    def send_command(
        self, code: int, size: int = 0, position: int = 0, buffer: memoryview | None = None
    ) -> PendingResult: ...

    def close_device(self) -> Awaitable[None] | None: ...


class ServerSet(Protocol):
    """The server calls of one virtual device set: all an engine needs of it (api.md).

    ``async with sds:`` holds what the set object needs while it is used (for a set
    in another process, the connection's reader task); leaving it with an exception
    signals abort, and closes the set if it is still open. Calls that may wait for the
    other process return ``X | Awaitable[X]`` (``settle`` them); ``wait_active`` and
    ``allocate_buffer`` are coroutines on both sides. Errors, states and results are
    those of the in-process ``ServerVirtualDeviceSet``.
    """

    @property
    def state(self) -> ServerState: ...

    @property
    def name(self) -> str | None: ...

    @property
    def abort_reason(self) -> str | None: ...

    @property
    def aborted_by(self) -> SetAbortCause | None: ...

    @property
    def configuration(self) -> VDConfig | None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def open(self, instance: str | None, name: str) -> Awaitable[None] | None: ...

    def get_configuration(self) -> VDConfig: ...

    def begin_configuration(
        self,
        features: int,
        block_size: int,
        alignment: int,
        max_transfer_size: int,
        timeout: float | None = None,
        *,
        honour_complete: bool = True,
    ) -> Awaitable[None] | None: ...

    def request_buffers(self, size: int, alignment: int, count: int) -> Awaitable[None] | None: ...

    def query_available_buffers(self, size: int, alignment: int = 0) -> int | Awaitable[int]: ...

    def end_configuration(self) -> Awaitable[None] | None: ...

    def open_device(self, name: str) -> ServerDevice | Awaitable[ServerDevice]: ...

    async def wait_active(self, timeout: float | None = None) -> None: ...

    async def allocate_buffer(self, size: int, alignment: int = 0) -> memoryview: ...

    def free_buffer(self, buffer: memoryview) -> None: ...

    def is_shared_buffer(self, buffer: object) -> bool: ...

    def signal_abort(self) -> None: ...

    def close(self) -> Awaitable[None] | None: ...
