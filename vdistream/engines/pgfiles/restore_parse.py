"""The sans-I/O reader of one device's entries (``layout``'s payload), fed in pieces.

``EntryParser(sink)`` takes the payload pieces ``framing.DeviceStreamParser`` emits, in
stream order, of any size, and calls the sink:

* ``sink.begin(header)`` once an entry's header and path are complete and checked;
* ``sink.data(view)`` for the entry's data bytes, in order: slices of the pieces fed
  (zero copy: valid only during the call) that never cross the entry's end;
* ``sink.end(crc)`` with the data CRC-32 the entry's footer states.

After the last entry come the zero bytes that pad the payload to the block size: a
header that starts with a zero byte starts the padding, and every later byte must be
zero. ``finish(total_length, entries)`` checks the trailer's account of this device
(``total_length`` payload bytes before the padding, ``entries`` entries).

Problems raise ``ValueError`` with a message the caller completes with the device.
"""

from __future__ import annotations

import enum
from typing import Protocol

from vdistream.engines.pgfiles.layout import FOOTER, HEADER_SIZE, EntryHeader

__all__ = ("MAX_PATH", "EntryParser", "EntrySink")

#: Longest path an entry may carry (Linux's PATH_MAX): a larger length is corruption.
MAX_PATH = 4096


class EntrySink(Protocol):
    def begin(self, header: EntryHeader) -> None: ...

    def data(self, view: memoryview) -> None: ...

    def end(self, crc: int) -> None: ...


class _State(enum.Enum):
    HEADER = "header"
    PATH = "path"
    DATA = "data"
    FOOTER = "footer"
    PADDING = "padding"


class EntryParser:
    """One device's payload into ``sink`` calls (module docstring)."""

    def __init__(self, sink: EntrySink) -> None:
        self.sink = sink
        self.offset = 0  # payload bytes fed so far
        self.entries = 0
        self.padding_start: int | None = None
        self._state = _State.HEADER
        self._small = bytearray()  # a header, a path or a footer being collected
        self._head = b""
        self._remaining = 0  # data bytes of the current entry still to come

    def feed(self, piece: bytes | memoryview) -> None:
        view = piece if isinstance(piece, memoryview) else memoryview(piece)
        self.offset += view.nbytes
        while view.nbytes:
            state = self._state
            if state is _State.DATA:
                take = min(self._remaining, view.nbytes)
                self.sink.data(view[:take])
                self._remaining -= take
                view = view[take:]
                if not self._remaining:
                    self._state = _State.FOOTER
            elif state is _State.HEADER:
                if not self._small and view[0] == 0:
                    self._state = _State.PADDING
                    self.padding_start = self.offset - view.nbytes
                    continue
                view = self._collect(view, HEADER_SIZE)
                if len(self._small) == HEADER_SIZE:
                    self._head = bytes(self._small)
                    self._small.clear()
                    length = EntryHeader.path_length(self._head)
                    if length > MAX_PATH:
                        raise ValueError(f"an entry announces a path of {length} bytes (corrupt)")
                    self._remaining = length
                    self._state = _State.PATH
                    if not length:
                        self._begin()
            elif state is _State.PATH:
                view = self._collect(view, self._remaining)
                if len(self._small) == self._remaining:
                    self._begin()
            elif state is _State.FOOTER:
                view = self._collect(view, FOOTER.size)
                if len(self._small) == FOOTER.size:
                    (crc,) = FOOTER.unpack(self._small)
                    self._small.clear()
                    self._state = _State.HEADER
                    self.entries += 1
                    self.sink.end(crc)
            else:  # padding: nothing but zeros up to the end
                if view.tobytes().count(0) != view.nbytes:  # padding is < one block
                    raise ValueError("non-zero bytes after the last entry (corrupt stream)")
                view = view[view.nbytes :]

    def _collect(self, view: memoryview, size: int) -> memoryview:
        take = min(size - len(self._small), view.nbytes)
        self._small += view[:take]
        return view[take:]

    def _begin(self) -> None:
        header = EntryHeader.unpack(self._head, bytes(self._small))
        self._small.clear()
        self._remaining = header.size
        self._state = _State.DATA if header.size else _State.FOOTER
        self.sink.begin(header)

    def finish(self, total_length: int, entries: int) -> None:
        """The payload ended: check it against the trailer's ``total_length``/``entries``."""
        if self._state not in (_State.HEADER, _State.PADDING) or self._small:
            raise ValueError(f"the payload ends inside an entry ({self._state.value})")
        end = self.padding_start if self.padding_start is not None else self.offset
        if end != total_length:
            raise ValueError(
                f"the entries end after {end} payload bytes, the trailer says {total_length}"
            )
        if self.entries != entries:
            raise ValueError(f"the stream holds {self.entries} entries, its trailer says {entries}")
