"""What travels on a device: the client's ``Command`` and the server's ``CommandResult``.

Both are small fixed-layout values (spec §3.1, §3.2) so that they could cross a socket
to another process unchanged; the buffer travels as a ``memoryview`` of the set's
buffer area, never as a copy.
"""

from __future__ import annotations

import dataclasses

from vdistream.protocol.codes import CommandCode

__all__ = ("BUFFER_COMMANDS", "Command", "CommandResult")

#: The commands whose ``buffer`` and ``size`` name data (spec §3.4).
BUFFER_COMMANDS = frozenset({CommandCode.READ, CommandCode.WRITE})


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class Command:
    """A command as ``get_command`` delivers it; read-only to the client.

    ``buffer`` is the data zone of a shared buffer for READ and WRITE (exactly ``size``
    bytes; writable for READ, read-only for WRITE) and ``None`` otherwise. ``prefix`` is
    the client's prefix zone just before the buffer's slot, when the client asked for
    one. ``size`` is overloaded as the spec says: a signed count for SKIP_*, the whence
    of SET_POSITION, the unload flag of LOAD.

    Commands compare by identity: the same command object must be handed back to
    ``complete_command``, as the spec demands of the ``VDC_Command`` pointer.
    """

    code: CommandCode
    size: int = 0
    position: int = 0
    buffer: memoryview | None = None
    prefix: memoryview | None = None
    #: Sequence number of this command within its set; the key the set tracks it by.
    serial: int = dataclasses.field(default=0, repr=False)


@dataclasses.dataclass(frozen=True, slots=True)
class CommandResult:
    """What the server side learns when a command completes (``VDS_Command`` outputs)."""

    completion: int
    bytes_transferred: int = 0
    position: int = 0

    @property
    def succeeded(self) -> bool:
        return self.completion == 0
