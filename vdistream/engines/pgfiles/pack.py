"""Entries packed into a device's buffers: the per-byte work of a files-mode backup.

``Entry`` is one thing to write (a file read from disk, or bytes from memory: a link's
target, ``backup_label``, the index); ``WorkList`` the entries the devices share, each
taking the next when it is free; ``Packer`` one device's side: ``fill()`` packs entries
into the set buffer it holds, back to back in the format of ``layout`` (header, path,
data, CRC-32 footer), opening files and reading them with ``os.preadv`` straight into
the buffer. It runs in a worker thread, one call a buffer: every byte is read once, and
its CRC-32 is computed once and combined (``crc32_combine``) into the file's and the
device payload's.

``global/pg_control`` is read whole first and again until its CRC-32C matches
(``read_control``): the server rewrites it in place, and a torn copy would never start.

Files that vanish before they are opened are skipped (not listed, not counted); a file
found shorter than listed is padded with zeros (``FLAG_PADDED`` when the open saw it
shorter), a longer one is read to its listed size only; ``required`` entries (WAL
segments) must exist.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import os
import time
from collections.abc import Sequence

from isal.isal_zlib import crc32_combine

from vdistream.engines.framing import crc32, round_up
from vdistream.engines.pgfiles.layout import (
    FLAG_PADDED,
    FOOTER,
    EntryHeader,
    EntryKind,
    FileRecord,
)
from vdistream.engines.pgfiles.walk import Item, ItemKind
from vdistream.engines.postgres import PostgresError

__all__ = ("CONTROL_PATH", "Entry", "Packer", "WorkList", "control_crc_ok", "read_control")

CONTROL_PATH = "global/pg_control"
#: Reads of ``pg_control`` while it changes under them before the backup gives up.
CONTROL_READS = 20
_CONTROL_CRC_SPAN = 1024  # ControlFileData (its CRC last) is a few hundred bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Entry:
    """One entry to write: from a file (``source``) or from memory (``data``)."""

    kind: EntryKind
    path: str
    size: int
    mode: int
    mtime_ns: int
    source: str | None = None
    data: bytes | None = None
    target: str | None = None
    required: bool = False  # a WAL segment: missing is an error, not a vanished file

    @classmethod
    def of(cls, item: Item) -> Entry:
        if item.kind is ItemKind.FILE:
            return cls(EntryKind.FILE, item.path, item.size, item.mode, item.mtime_ns, item.source)
        if item.kind is ItemKind.DIRECTORY:
            return cls(EntryKind.DIRECTORY, item.path, 0, item.mode, item.mtime_ns)
        target = os.fsencode(item.target or "")
        return cls(
            EntryKind.SYMLINK,
            item.path,
            len(target),
            item.mode,
            item.mtime_ns,
            data=target,
            target=item.target,
        )

    @classmethod
    def memory(cls, path: str, data: bytes, kind: EntryKind = EntryKind.FILE) -> Entry:
        return cls(kind, path, len(data), 0o600, time.time_ns(), data=data)


@functools.cache
def _crc32c_table() -> tuple[int, ...]:
    """CRC-32C (Castagnoli, reflected: PostgreSQL's ``pg_crc32c``) by byte."""
    table = []
    for byte in range(256):
        value = byte
        for _ in range(8):
            value = (value >> 1) ^ 0x82F63B78 if value & 1 else value >> 1
        table.append(value)
    return tuple(table)


def control_crc_ok(data: bytes) -> bool:
    """Whether ``data`` (a ``pg_control``) holds a valid ``ControlFileData``: its
    CRC-32C, stored right after the bytes it covers, matches at some 4-byte aligned
    offset (the struct's layout, and so the offset, differs between versions)."""
    table, crc = _crc32c_table(), 0xFFFFFFFF
    for offset, byte in enumerate(data[:_CONTROL_CRC_SPAN]):
        aligned = offset >= 8 and not offset % 4 and offset + 4 <= len(data)
        if aligned and crc ^ 0xFFFFFFFF == int.from_bytes(data[offset : offset + 4], "little"):
            return True
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return False


def _read_whole(source: str, size: int) -> bytes | None:
    """``size`` bytes of ``source`` (zeros past its end); None if it is gone."""
    try:
        with open(source, "rb", buffering=0) as file:
            data = file.read(size)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PostgresError(f"cannot read {source}: {exc.strerror}") from None
    return data + bytes(size - len(data))


def read_control(source: str, size: int) -> bytes | None:
    """``pg_control`` read whole, and again while its CRC-32C does not match and the
    content changes: the server rewrites it in place (every checkpoint), and a read
    that meets that write sees half of each, which no server would start from. A
    stable content whose CRC matches no known layout is kept as read (a layout this
    check does not know); one still changing after ``CONTROL_READS`` reads fails."""
    previous = None
    for _ in range(CONTROL_READS):
        data = _read_whole(source, size)
        if data is None or control_crc_ok(data) or data == previous:
            return data
        previous = data
    raise PostgresError(
        f"{source} kept changing while it was read ({CONTROL_READS} reads, none with a "
        "valid CRC): retry the backup"
    )


class WorkList:
    """A list of entries shared by the devices: each takes the next when it is free.

    ``deque.popleft`` is atomic, so the worker threads of several devices take from it
    without a lock."""

    def __init__(self, entries: Sequence[Entry] = ()) -> None:
        self._entries = collections.deque(entries)

    def extend(self, entries: Sequence[Entry]) -> None:
        self._entries.extend(entries)

    def take(self) -> Entry | None:
        try:
            return self._entries.popleft()
        except IndexError:
            return None


class Packer:
    """One device's entries packed into its buffers, in a worker thread (``fill``).

    Counts what the trailer needs: ``total`` (payload bytes before the padding),
    ``payload`` (with it), ``entries`` and ``crc`` (the payload's CRC-32, kept as the
    bytes are placed: a file's bytes are read once, their CRC-32 is combined into the
    file's and the payload's with ``crc32_combine``); ``records`` are the finished
    entries for the index."""

    def __init__(self, device: int) -> None:
        self.device = device
        self.records: list[FileRecord] = []
        self.total = 0
        self.payload = 0
        self.entries = 0
        self.crc = 0
        self.buffer: memoryview | None = None
        self.filled = 0
        self._out: memoryview | None = None  # bytes still to place: a header, a footer
        self._entry: Entry | None = None
        self._fd = -1
        self._offset = 0
        self._left = 0
        self._eof = False
        self._file_crc = 0

    def fill(self, sources: Sequence[WorkList]) -> bool:
        """Fill ``buffer`` from ``filled`` on with entries taken from ``sources`` (in
        that order); True when it is full, False when the sources ran dry first (the
        buffer keeps what it holds, for the next call)."""
        view = self.buffer
        assert view is not None
        pos, end = self.filled, view.nbytes
        try:
            while pos < end:
                out = self._out
                if out is not None:
                    count = min(out.nbytes, end - pos)
                    view[pos : pos + count] = out[:count]
                    self.crc = crc32(out[:count], self.crc)
                    pos += count
                    self._out = out[count:] if count < out.nbytes else None
                elif self._entry is not None:
                    pos = self._read(view, pos, end)
                else:
                    entry = None
                    for source in sources:
                        entry = source.take()
                        if entry is not None:
                            break
                    if entry is None:
                        return False
                    self._begin(entry)
        finally:
            self.total += pos - self.filled
            self.filled = pos
        self.payload += end
        return True

    def finish(self, block: int) -> int:
        """Pad the held buffer to a multiple of ``block`` and count it; its size."""
        view = self.buffer
        assert view is not None
        assert self._entry is None
        assert self._out is None
        size = round_up(self.filled, block)
        view[self.filled : size] = bytes(size - self.filled)
        self.crc = crc32(view[self.filled : size], self.crc)
        self.payload += size
        return size

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def _begin(self, entry: Entry) -> None:
        """Start ``entry``: its header (and, from memory, all of it) goes out next."""
        flags = 0
        if entry.path == CONTROL_PATH and entry.source is not None:
            data = read_control(entry.source, entry.size)
            if data is None:
                return  # gone since the walk (as any file: not listed)
            entry = dataclasses.replace(entry, source=None, data=data)
        if entry.source is not None:
            try:
                fd = os.open(entry.source, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                if entry.required:
                    raise PostgresError(f"{entry.source} is missing (it must be copied)") from None
                return  # gone since the walk: WAL replay recreates it if it mattered
            except OSError as exc:
                raise PostgresError(f"cannot open {entry.source}: {exc.strerror}") from None
            self._fd = fd
            if os.fstat(fd).st_size < entry.size:
                flags = FLAG_PADDED
            with contextlib.suppress(OSError):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        head = EntryHeader(
            entry.kind, os.fsencode(entry.path), entry.size, entry.mode, entry.mtime_ns, flags
        )
        header = memoryview(bytearray(head.packed_size))
        head.pack_into(header)
        self.entries += 1
        if entry.source is None or not entry.size:
            self.close()
            data = entry.data or b""
            checksum = crc32(data) if data else 0
            self._out = memoryview(bytes(header) + data + FOOTER.pack(checksum))
            self._record(entry, checksum)
            return
        self._out = header
        self._entry = entry
        self._offset = 0
        self._left = entry.size
        self._eof = False
        self._file_crc = 0

    def _read(self, view: memoryview, pos: int, end: int) -> int:
        """Read the current file into ``view[pos:end]``; the new position."""
        entry = self._entry
        assert entry is not None
        want = min(self._left, end - pos)
        target = view[pos : pos + want]
        got = 0
        while got < want and not self._eof:
            try:
                count = os.preadv(self._fd, [target[got:]], self._offset + got)
            except OSError as exc:
                raise PostgresError(f"reading {entry.source} failed: {exc.strerror}") from None
            if count == 0:
                self._eof = True  # the file shrank: zeros stand for its end
            got += count
        if got < want:
            target[got:] = bytes(want - got)
        # one pass over the bytes: the piece's CRC joins the file's and the payload's
        piece = crc32(target)
        self._file_crc = crc32_combine(self._file_crc, piece, want)
        self.crc = crc32_combine(self.crc, piece, want)
        self._offset += want
        self._left -= want
        if not self._left:
            self._end_file()
        return pos + want

    def _end_file(self) -> None:
        entry = self._entry
        assert entry is not None
        self.close()
        self._entry = None
        self._out = memoryview(FOOTER.pack(self._file_crc))
        self._record(entry, self._file_crc)

    def _record(self, entry: Entry, checksum: int) -> None:
        self.records.append(
            FileRecord(
                entry.path,
                entry.kind,
                entry.size,
                checksum,
                self.device,
                entry.mode,
                entry.mtime_ns,
                entry.target,
            )
        )
