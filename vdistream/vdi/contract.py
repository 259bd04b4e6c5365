"""The client side of a set as the job and its pumps use it: two small Protocols.

Our own :class:`~vdistream.vdi.ClientVirtualDeviceSet` satisfies them, and so does
SQL Server's through ``libsqlvdi.so`` (``vdistream.sqlserver.SqlVdiDeviceSet``): an
engine says which one its job must create (``Engine.client_set``), and the coordinator
and the pumps run unchanged over either.
"""

from __future__ import annotations

from typing import Protocol

from vdistream.protocol import ClientState, Command, SetAbortCause, VDConfig
from vdistream.vdi.core import SetStatistics

__all__ = ("ClientDevice", "ClientSet")


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
    * ``signal_abort()``: abort the whole set at once; idempotent; never blocks.
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

    def signal_abort(self) -> None: ...

    def close(self) -> None: ...

    def statistics(self) -> SetStatistics: ...
