"""The stream format of PostgreSQL's ``files`` mode: whole files, packed per device.

Each device's stream uses the striping engine's framing (``vdistream.engines.framing``):
a header block, a payload, a trailer block, all of the block size ``B``. The header's
``flags`` has ``FLAG_FILES`` set, so a files-mode stream is never mistaken for a striped
one. The trailer's fields mean, for this mode:

* ``total_length``: this device's payload bytes before the final padding;
* ``payload_length``: this device's payload bytes (padding included, a multiple of B);
* ``chunk_count``: the entries on this device;
* ``payload_crc32``: as in the striped format.

The payload is a sequence of entries, back to back (no alignment), then zero padding up
to a multiple of ``B``. An entry is::

    +----------------------+-----------------+------------------+----------------+
    | entry header 32 B    | path (P bytes)  | data (S bytes)   | data CRC-32 4 B|
    +----------------------+-----------------+------------------+----------------+

Entry header (little-endian)::

    off len field
      0   4 magic            b"VDFE"
      4   1 kind             1 FILE, 2 DIRECTORY, 3 SYMLINK, 4 INDEX
      5   1 flags            bit 0: PADDED (the file shrank while it was read; zeros
                             stand for the missing end, which WAL replay rewrites)
      6   2 path length P    bytes of the path that follows
      8   4 mode             st_mode & 0o7777
     12   8 mtime            st_mtime_ns
     20   8 size S           data bytes: a file's content, a symlink's target, the
                             index's JSON; 0 for a directory
     28   4 header CRC-32    of bytes 0..27 followed by the path

The path is relative to the data directory, ``/``-separated, raw bytes (``os.fsencode``),
never absolute, never with ``..``. A tablespace is the SYMLINK ``pg_tblspc/<oid>``
(data: the absolute target) and its content is stored under ``pg_tblspc/<oid>/...``.
The data CRC-32 is zlib's polynomial (``framing.crc32``: ISA-L) over the S data bytes;
for an empty entry it is 0.

Device 0's last entry is the INDEX (path ``INDEX_PATH``): UTF-8 JSON (``BackupIndex``)
listing every FILE, DIRECTORY and SYMLINK entry of every device, so a restore knows
that nothing is missing even without the catalog's manifest.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import struct
from collections.abc import Mapping
from typing import Any

from vdistream.engines.framing import crc32

__all__ = (
    "ENTRY_HEADER",
    "ENTRY_MAGIC",
    "FLAG_FILES",
    "FLAG_PADDED",
    "FOOTER",
    "HEADER_SIZE",
    "INDEX_FORMAT",
    "INDEX_PATH",
    "BackupIndex",
    "EntryHeader",
    "EntryKind",
    "FileRecord",
)

#: Header flag of a files-mode device stream (``framing.StreamHeader.flags``).
FLAG_FILES = 0x2
ENTRY_MAGIC = b"VDFE"
#: Entry flag: the file was shorter when read than when listed; zeros fill its end.
FLAG_PADDED = 0x1
INDEX_PATH = "vdistream_index.json"
INDEX_FORMAT = 1

ENTRY_HEADER = struct.Struct("<4sBBHIqQ")  # 28 bytes, then the header CRC-32
FOOTER = struct.Struct("<I")  # the data CRC-32
_CRC = struct.Struct("<I")
HEADER_SIZE = ENTRY_HEADER.size + _CRC.size  # 32


class EntryKind(enum.IntEnum):
    FILE = 1
    DIRECTORY = 2
    SYMLINK = 3
    INDEX = 4


@dataclasses.dataclass(frozen=True, slots=True)
class EntryHeader:
    """One entry's header (module docstring); ``path`` is the raw path bytes."""

    kind: EntryKind
    path: bytes
    size: int
    mode: int = 0o600
    mtime_ns: int = 0
    flags: int = 0

    @property
    def packed_size(self) -> int:
        """Bytes of the header with its path."""
        return HEADER_SIZE + len(self.path)

    def pack_into(self, view: memoryview, offset: int = 0) -> int:
        """Write header and path at ``offset``; the offset after them."""
        fields = ENTRY_HEADER.pack(
            ENTRY_MAGIC,
            int(self.kind),
            self.flags,
            len(self.path),
            self.mode,
            self.mtime_ns,
            self.size,
        )
        end = offset + ENTRY_HEADER.size
        view[offset:end] = fields
        _CRC.pack_into(view, end, crc32(self.path, crc32(fields)))
        start = end + _CRC.size
        view[start : start + len(self.path)] = self.path
        return start + len(self.path)

    @classmethod
    def unpack(cls, head: bytes | memoryview, path: bytes) -> EntryHeader:
        """Parse ``head`` (exactly ``HEADER_SIZE`` bytes) and its ``path``.

        ``ValueError`` names what is wrong (the caller turns it into a
        ``StreamFormatError`` that names the device).
        """
        magic, kind, flags, length, mode, mtime_ns, size = ENTRY_HEADER.unpack_from(head)
        if magic != ENTRY_MAGIC:
            raise ValueError("an entry does not start with its magic (corrupt stream)")
        if length != len(path):
            raise ValueError(f"the entry's path is {len(path)} bytes, its header says {length}")
        (crc,) = _CRC.unpack_from(head, ENTRY_HEADER.size)
        if crc != crc32(path, crc32(bytes(head[: ENTRY_HEADER.size]))):
            raise ValueError("an entry header is corrupt (CRC mismatch)")
        try:
            entry_kind = EntryKind(kind)
        except ValueError:
            raise ValueError(f"unknown entry kind {kind}") from None
        return cls(entry_kind, bytes(path), size, mode, mtime_ns, flags)

    @staticmethod
    def path_length(head: bytes | memoryview) -> int:
        """The path length a (not yet checked) header announces."""
        return int(ENTRY_HEADER.unpack_from(head)[3])


@dataclasses.dataclass(frozen=True, slots=True)
class FileRecord:
    """What the index (and the catalog's manifest) says of one entry."""

    path: str  # os.fsdecode of the entry's path
    kind: EntryKind
    size: int
    crc32: int
    device: int
    mode: int
    mtime_ns: int
    target: str | None = None  # a symlink's target

    def to_json(self) -> list[Any]:
        return [
            self.path,
            int(self.kind),
            self.size,
            self.crc32,
            self.device,
            self.mode,
            self.mtime_ns,
            self.target,
        ]

    @classmethod
    def from_json(cls, row: list[Any]) -> FileRecord:
        path, kind, size, crc, device, mode, mtime_ns, target = row
        return cls(
            str(path),
            EntryKind(kind),
            int(size),
            int(crc),
            int(device),
            int(mode),
            int(mtime_ns),
            target,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class BackupIndex:
    """The INDEX entry: every entry of the backup, and what PostgreSQL said of it.

    ``start_lsn``/``stop_lsn`` are ``pg_backup_start``/``pg_backup_stop``'s positions,
    ``timeline`` the start's timeline, ``wal`` the WAL segment names copied into
    ``pg_wal/``; ``system_identifier`` and ``server_version`` (``server_version_num``)
    identify the cluster.
    """

    backup_id: str
    records: tuple[FileRecord, ...]
    start_lsn: str
    stop_lsn: str
    timeline: int
    wal: tuple[str, ...]
    system_identifier: str
    server_version: int
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_bytes(self) -> bytes:
        body = {
            "format": INDEX_FORMAT,
            "backup_id": self.backup_id,
            "start_lsn": self.start_lsn,
            "stop_lsn": self.stop_lsn,
            "timeline": self.timeline,
            "wal": list(self.wal),
            "system_identifier": self.system_identifier,
            "server_version": self.server_version,
            "extra": dict(self.extra),
            "records": [record.to_json() for record in self.records],
        }
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> BackupIndex:
        """``ValueError`` if ``data`` is not an index of a known format."""
        try:
            body = json.loads(data)
            if body.get("format") != INDEX_FORMAT:
                raise ValueError(f"unsupported index format {body.get('format')!r}")
            return cls(
                backup_id=str(body["backup_id"]),
                records=tuple(FileRecord.from_json(row) for row in body["records"]),
                start_lsn=str(body["start_lsn"]),
                stop_lsn=str(body["stop_lsn"]),
                timeline=int(body["timeline"]),
                wal=tuple(str(name) for name in body["wal"]),
                system_identifier=str(body["system_identifier"]),
                server_version=int(body["server_version"]),
                extra=dict(body.get("extra") or {}),
            )
        except (KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"the backup's index is unreadable: {exc}") from exc
