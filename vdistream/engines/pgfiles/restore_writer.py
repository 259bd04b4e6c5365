"""One device's side of a files-mode restore: its stream parsed and written, in a worker
thread, one call per READ buffer.

``DeviceWriter.consume(view)`` takes the bytes one READ brought (a memoryview of the
set's buffer) and does all the per-byte work in the calling (worker) thread, in one
pass: the stream framing (``framing.DeviceStreamParser``), the entries
(``restore_parse.EntryParser``), and for every file the ``os.write`` of the buffer's
own bytes (no copy) with the CRC-32 of those same bytes, checked against the entry's
footer when the file ends. A file is then given its mode (never set-user/group-id)
and mtime (after its content) and, unless the caller syncs the file system at the end,
fsynced before it is closed; a file larger than ``threads.WRITEBACK_WINDOW`` has its
writeback started as it is written (``threads.Writeback``, pages kept cached), so that
its fsync is short.
``finish_stream()`` checks the stream's end (trailer, entry count, padding).

When the manifest's records are given (``expected``), an entry it does not list with
the same kind, size, device and mode is refused before anything of it is written.

Per entry kind:

* FILE: created exclusively (fresh) or replaced (delta); in a delta restore a file
  the manifest lists with the same size and CRC-32 as the one in place is left alone
  (read and checked when its entry arrives), its stream bytes still checked.
  ``global/pg_control`` is held in memory (8 KiB) for ``RestoreTarget.finish``.
* DIRECTORY: created (``RestoreTarget.directory_entry``); mode and time at the end.
* SYMLINK: ``pg_tblspc/<oid>`` must name the location the manifest gives (the
  location is where the tablespace's entries go); any other symlink must be relative
  without ``..``.
* INDEX: device 0's last entry, collected and parsed (``layout.BackupIndex``).

Every entry that arrived is recorded (``arrived``: path -> kind, size, CRC-32) for the
engine's check against the index. Errors name the file and the device:
``StreamFormatError`` for what the stream says, ``EndpointError`` for what the target's
file system refused.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
from collections.abc import Mapping

from vdistream.engines.base import StreamFormatError
from vdistream.engines.framing import DeviceStreamParser, StreamHeader, crc32
from vdistream.engines.pgfiles.layout import (
    FLAG_FILES,
    INDEX_PATH,
    BackupIndex,
    EntryHeader,
    EntryKind,
    FileRecord,
)
from vdistream.engines.pgfiles.restore_parse import MAX_PATH, EntryParser
from vdistream.engines.pgfiles.target import PG_CONTROL, RestoreTarget, unsafe_path
from vdistream.engines.scoped import EndpointError
from vdistream.threads import WRITEBACK_WINDOW, Writeback

__all__ = ("MAX_INDEX_BYTES", "STREAMING_WRITEBACK", "Arrival", "DeviceWriter")

#: Bound of the index entry held in memory (a cluster of a million files: ~100 MiB).
MAX_INDEX_BYTES = 1 << 30
#: Streaming writeback of large files while they are written (``threads.Writeback``):
#: measured (docs/benchmarks.md), kept as a switch for that measurement.
STREAMING_WRITEBACK = True
_CHECK_READ = 1 << 20
#: The permission bits a restored file or directory may get: never set-user/group-id
#: (PostgreSQL's files are 0600/0640, its directories 0700/0750; a stream that asks for
#: more must not plant a set-uid file, owned by root when root restores without owner).
_FILE_MODES = 0o777
_DIR_MODES = 0o1777
_FRESH = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_REPLACE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclasses.dataclass(frozen=True, slots=True)
class Arrival:
    kind: EntryKind
    size: int
    crc32: int


class _Mode:
    WRITE = 1  # to fd
    SKIP = 2  # delta: unchanged, only checked
    HOLD = 3  # pg_control, symlink target, index: collected in memory


class DeviceWriter:
    """Device ``index``'s stream into ``target`` (module docstring)."""

    def __init__(
        self,
        target: RestoreTarget,
        *,
        index: int,
        device_count: int,
        block_size: int,
        set_name: str,
        label: str | None,
        expected: Mapping[str, FileRecord] | None = None,
        sync_files: bool = True,
    ) -> None:
        self.target = target
        self.index = index
        self.set_name = set_name
        self.label = label
        self.expected = expected
        self.sync_files = sync_files
        self.stream = DeviceStreamParser(
            block_size=block_size,
            device_index=index,
            device_count=device_count,
            set_name=set_name,
            device=label,
        )
        self.entries = EntryParser(self)
        self.arrived: dict[str, Arrival] = {}
        self.backup_index: BackupIndex | None = None
        self.pg_control: tuple[bytes, int, int] | None = None
        self.written_files = 0
        self.skipped_files = 0
        self.file_bytes = 0
        self._checked_header = False
        # the entry being restored
        self._header: EntryHeader | None = None
        self._name = ""
        self._path = b""
        self._mode = _Mode.WRITE
        self._fd: int | None = None
        self._writeback: Writeback | None = None
        self._written = 0  # bytes of the current file written so far
        self._crc = 0
        self._held = bytearray()
        self._read_buffer: bytearray | None = None

    @property
    def header(self) -> StreamHeader | None:
        return self.stream.header

    # --- errors -------------------------------------------------------------------------

    def _format_error(self, message: str) -> StreamFormatError:
        return StreamFormatError(message, set_name=self.set_name, device=self.label)

    def _os_error(self, exc: OSError, doing: str) -> EndpointError:
        path = os.fsdecode(self._path) if self._path else str(self.target.directory)
        return EndpointError(
            f"cannot {doing} {path} (entry {self._name!r}): {exc.strerror or exc}",
            device=self.label,
        )

    # --- the thread calls -----------------------------------------------------------------

    def consume(self, view: memoryview) -> None:
        """One READ's bytes (module docstring); runs in a worker thread."""
        try:
            for piece in self.stream.feed(view):
                if not self._checked_header:
                    self._check_header()
                self.entries.feed(piece)
        except ValueError as exc:
            raise self._format_error(str(exc)) from exc
        except OSError as exc:
            raise self._os_error(exc, "write") from exc

    def finish_stream(self) -> None:
        """The stream ended: its last block, trailer and entry count (worker thread)."""
        final, trailer = self.stream.finish()
        if not self._checked_header:
            self._check_header()
        try:
            self.entries.feed(final)
            self.entries.finish(trailer.total_length, trailer.chunk_count)
        except ValueError as exc:
            raise self._format_error(str(exc)) from exc
        except OSError as exc:
            raise self._os_error(exc, "write") from exc

    def abandon(self) -> None:
        """Close what a failed restore left open."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def _check_header(self) -> None:
        header = self.stream.header
        assert header is not None
        if not header.flags & FLAG_FILES:
            raise self._format_error(
                "this stream is not a PostgreSQL files-mode backup (no files flag in its header)"
            )
        self._checked_header = True

    # --- EntrySink ------------------------------------------------------------------------

    def begin(self, header: EntryHeader) -> None:
        if self.backup_index is not None:
            raise ValueError("an entry follows the index (the index must be the last entry)")
        raw = header.path
        self._header = header
        self._name = os.fsdecode(raw)
        self._path = b""
        self._crc = 0
        self._held.clear()
        self._mode = _Mode.HOLD
        kind = header.kind
        if kind is EntryKind.INDEX:
            if self.index != 0 or raw != INDEX_PATH.encode():
                raise ValueError(f"an index entry {self._name!r} on a device other than the first")
            if header.size > MAX_INDEX_BYTES:
                raise ValueError(f"the index announces {header.size} bytes (corrupt)")
            return
        problem = unsafe_path(raw)
        if problem is not None:
            raise ValueError(f"the entry {self._name!r} is refused: {problem}")
        if self._name in self.arrived:
            raise ValueError(f"the entry {self._name!r} arrived twice on this device")
        if self.expected is not None:
            self._check_listed(header)
        self._check_tablespace(raw, kind)
        self._path = self.target.resolve(raw)
        if kind is EntryKind.DIRECTORY:
            if header.size:
                raise ValueError(f"the directory entry {self._name!r} carries {header.size} bytes")
            self.target.directory_entry(self._path, header.mode & _DIR_MODES, header.mtime_ns)
        elif kind is EntryKind.SYMLINK:
            if header.size > MAX_PATH:
                raise ValueError(
                    f"the symlink {self._name!r} announces a {header.size}-byte target"
                )
        elif raw != PG_CONTROL:
            self._open_file(header)

    def _check_listed(self, header: EntryHeader) -> None:
        """The manifest lists this entry, of this kind, size and mode, on this device: checked
        BEFORE anything is written, so that a stream that is not the manifest's backup
        (another backup's stream, a tampered one) writes nothing, not even through a
        symlink a delta restore's target already holds."""
        record = self.expected.get(self._name) if self.expected is not None else None
        if record is None:
            raise ValueError(f"the entry {self._name!r} is not in the backup's manifest")
        if (record.kind, record.size, record.device) != (header.kind, header.size, self.index):
            raise ValueError(
                f"the entry {self._name!r} is a {header.kind.name.lower()} of {header.size} "
                f"bytes on device {self.index}; the manifest lists a "
                f"{record.kind.name.lower()} of {record.size} bytes on device {record.device}"
            )
        if record.mode != header.mode:
            raise ValueError(
                f"the entry {self._name!r} has mode {header.mode:04o}, the manifest lists "
                f"{record.mode:04o}"
            )

    def _check_tablespace(self, raw: bytes, kind: EntryKind) -> None:
        parts = raw.split(b"/", 2)
        if parts[0] != b"pg_tblspc" or len(parts) < 2:
            return
        if self.target.records is None and (kind is EntryKind.SYMLINK or len(parts) == 3):
            raise ValueError(
                f"the backup has a tablespace ({self._name!r}): restoring one needs the "
                "backup's file list (its manifest), which this restore was not given"
            )

    def _open_file(self, header: EntryHeader) -> None:
        path = self._path
        self.target.ensure_parent(path)
        if self.target.delta:
            if self._unchanged(path, header):
                self._mode = _Mode.SKIP
                return
            if os.path.islink(path):
                os.unlink(path)  # O_NOFOLLOW would refuse it; the backup has a file here
            elif os.path.isdir(path):
                shutil.rmtree(path)
            self._fd = os.open(path, _REPLACE, 0o600)
        else:
            self._fd = os.open(path, _FRESH, 0o600)
        self._mode = _Mode.WRITE
        self._written = 0
        # Large files: the disk writes while the stream arrives, so the fsync is short.
        # The pages stay cached (drop=False): the server started on them reads them.
        big = STREAMING_WRITEBACK and self.sync_files and header.size > WRITEBACK_WINDOW
        self._writeback = Writeback(self._fd, drop=False) if big else None

    def _unchanged(self, path: bytes, header: EntryHeader) -> bool:
        """Delta: whether the file in place already is the listed one (size and CRC-32)."""
        record = self.expected.get(self._name) if self.expected is not None else None
        if record is None or record.kind is not EntryKind.FILE or record.size != header.size:
            return False
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_size != header.size:
                return False
            if self._read_buffer is None:
                self._read_buffer = bytearray(_CHECK_READ)
            buffer = memoryview(self._read_buffer)
            crc = 0
            while count := os.readv(fd, [buffer]):
                crc = crc32(buffer[:count], crc)
            return crc == record.crc32
        finally:
            os.close(fd)

    def data(self, view: memoryview) -> None:
        self._crc = crc32(view, self._crc)
        mode = self._mode
        if mode == _Mode.WRITE:
            fd = self._fd
            assert fd is not None
            while view.nbytes:
                count = os.write(fd, view)
                view = view[count:]
                self._written += count
            if self._writeback is not None:
                self._writeback.wrote(self._written)
        elif mode == _Mode.HOLD:
            self._held += view

    def end(self, crc: int) -> None:
        header = self._header
        assert header is not None
        self._header = None
        if crc != self._crc:
            self.abandon()
            what = {EntryKind.FILE: "file", EntryKind.SYMLINK: "symlink"}.get(header.kind, "entry")
            raise ValueError(f"the {what} {self._name} does not match its CRC-32 (corrupt)")
        kind = header.kind
        if kind is EntryKind.INDEX:
            self.backup_index = BackupIndex.from_bytes(bytes(self._held))
            self._held.clear()
            return
        if kind is EntryKind.FILE:
            self._end_file(header)
        elif kind is EntryKind.SYMLINK:
            self._symlink(header, bytes(self._held))
        self.arrived[self._name] = Arrival(kind, header.size, crc)

    def _end_file(self, header: EntryHeader) -> None:
        mtime = (header.mtime_ns, header.mtime_ns)
        self.file_bytes += header.size
        if self._mode == _Mode.HOLD:  # pg_control: written last, by the target
            self.pg_control = (bytes(self._held), header.mode & _FILE_MODES, header.mtime_ns)
            self._held.clear()
            self.written_files += 1
            return
        if self._mode == _Mode.SKIP:
            info = os.lstat(self._path)
            if stat.S_IMODE(info.st_mode) != header.mode & _FILE_MODES:
                os.chmod(self._path, header.mode & _FILE_MODES)
            if info.st_mtime_ns != header.mtime_ns:
                os.utime(self._path, ns=mtime)
            self.skipped_files += 1
            return
        fd = self._fd
        assert fd is not None
        try:
            os.fchmod(fd, header.mode & _FILE_MODES)
            os.utime(fd, ns=mtime)  # after the content, which would change it
            if self.sync_files:
                os.fsync(fd)
        finally:
            self._fd = None
            self._writeback = None
            os.close(fd)
        self.written_files += 1

    def _symlink(self, header: EntryHeader, target: bytes) -> None:
        raw = header.path
        parts = raw.split(b"/")
        if len(parts) == 2 and parts[0] == b"pg_tblspc":
            recorded = self.target.recorded_location(parts[1])
            location = self.target.tablespace_location(parts[1])
            if recorded is None or location is None:
                raise ValueError(f"the tablespace {self._name!r} is not in the backup's manifest")
            if target != recorded:
                raise ValueError(
                    f"the tablespace {self._name!r} points to {os.fsdecode(target)!r}, "
                    f"the manifest says {os.fsdecode(recorded)!r}"
                )
            target = location  # where its files are restored
        elif target.startswith(b"/") or b".." in target.split(b"/") or b"\0" in target:
            raise ValueError(
                f"the symlink {self._name!r} points to {os.fsdecode(target)!r}, outside the "
                "data directory: refused"
            )
        path = self._path
        self.target.ensure_parent(path)
        if self.target.delta and os.path.lexists(path):
            if os.path.islink(path) and os.readlink(path) == target:
                self.skipped_files += 1
                return
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        os.symlink(target, path)
        os.utime(path, ns=(header.mtime_ns, header.mtime_ns), follow_symlinks=False)
        self.written_files += 1
