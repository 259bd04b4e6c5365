"""What both ends of a set's connection do alike with their socket.

* ``Gatherer``: the records of one step of the event loop go out as one message
  (docs/transport.md §2). The first record of a step goes at once (a lone command or
  completion waits for nothing); those that follow in the same step are gathered and
  sent together when the step is done (a ``call_soon`` flush), at most ``MAX_MESSAGE``
  bytes: one more wake-up of the peer for all of them. Outside a running loop every
  record goes at once.
* ``received_fds``: the descriptors a message carried (``SCM_RIGHTS``).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable

from vdistream.transport import wire

__all__ = ("Gatherer", "received_fds")

_FD = struct.Struct("i")  # a descriptor in SCM_RIGHTS data (native int)


class Gatherer:
    """Gathers records into messages and hands each message to ``send`` (the owner's
    way to put one message on its socket, or in its queue when the socket is full)."""

    __slots__ = ("_bytes", "_records", "_scheduled", "_send")

    def __init__(self, send: Callable[[bytes], None]) -> None:
        self._send = send
        self._records: list[bytes] = []
        self._bytes = 0
        self._scheduled = False  # a record went out this step; a flush is scheduled

    def add(self, data: bytes) -> None:
        """Send the record ``data``: now, or with the others of this step."""
        if self._scheduled:
            if self._bytes + len(data) > wire.MAX_MESSAGE:
                self.flush(rescheduled=True)
            self._records.append(data)
            self._bytes += len(data)
            return
        self._send(data)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._scheduled = True
        loop.call_soon(self.flush)

    def flush(self, *, rescheduled: bool = False) -> None:
        """Send what was gathered as one message; ``rescheduled``: the step goes on
        (the message was full), so its later records are still gathered."""
        self._scheduled = rescheduled
        if not self._records:
            return
        data = self._records[0] if len(self._records) == 1 else b"".join(self._records)
        self.clear()
        self._send(data)

    def clear(self) -> None:
        """Drop what was gathered (the connection is gone)."""
        self._records.clear()
        self._bytes = 0


def received_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors of a message's ``SCM_RIGHTS`` data (``recvmsg``'s ancillary)."""
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % _FD.size
            fds.extend(fd for (fd,) in _FD.iter_unpack(data[:usable]))
    return fds
