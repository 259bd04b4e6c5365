"""The stream format of the striping engine (its stand-in for SQL Server's MTF).

A backup of ``L`` logical bytes over ``N`` devices is cut into chunks of ``C`` bytes
(``C`` a multiple of the block size ``B``; the engine uses its MAXTRANSFERSIZE).
Chunk ``k`` goes to device ``k % N``, round-robin, so device ``d`` carries chunks
``d, d + N, d + 2N, ...`` in that order. Every chunk is full except the last one of
the whole backup, which is padded with zeros to a multiple of ``B``.

Each device's stream is self-describing and block-aligned::

    +--------------+-------------------------------------------+---------------+
    | header block | payload: this device's chunks, in order    | trailer block |
    |   B bytes    | (a multiple of B bytes, possibly empty)    |   B bytes     |
    +--------------+-------------------------------------------+---------------+

Header block (little-endian, unused bytes zero)::

    off len field
      0   8 magic            b"VDSTRHDR"
      8   2 format version   1
     10   2 field bytes      48 (the size of this table)
     12  16 backup id        random, shared by every device of one backup
     28   2 device index     0..N-1
     30   2 device count     N
     32   4 block size       B
     36   4 chunk size       C
     40   4 flags            bit 0: written to disk-like (random access) devices
     44   4 CRC-32           of bytes 0..43

Trailer block (little-endian, unused bytes zero)::

    off len field
      0   8 magic            b"VDSTRTRL"
      8   2 format version   1
     10   2 field bytes      64
     12  16 backup id
     28   2 device index
     30   2 device count
     32   8 total length     L, the logical size of the whole backup
     40   8 payload length   bytes between this device's header and trailer
     48   8 chunk count      chunks on this device
     56   4 payload CRC-32   of this device's payload (padding included)
     60   4 CRC-32           of bytes 0..59

The payload check is a CRC-32 (as SQL Server's own CHECKSUM is not cryptographic
either): zlib's polynomial, computed by ISA-L (``isal``, ~11 GiB/s per core here,
the very same values as ``zlib.crc32`` at ~3.7) where it is installed, since the
check runs on the event loop of a fast backup; SHA-256 manages ~1.3. The
backup's integrity against tampering is vdistream's SHA-256 of every stored stream,
recorded in the manifest, and the encryption's authentication tags.

A restore can therefore read each stream with any read sizes, find the trailer as the
last block of the stream, and detect a missing, truncated, swapped, duplicated or
foreign stream: the header names the device's place in the backup, the trailer its
length and digest, and every device names the same backup id and total length.

``DeviceStreamParser`` is the sans-I/O reader of one device's stream.
"""

from __future__ import annotations

import dataclasses
import struct
import uuid
import zlib
from typing import TYPE_CHECKING, Any, ClassVar, Self

from vdistream.engines.base import StreamFormatError

try:  # the same CRC-32 as zlib's, three times as fast (module doc)
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - isal is a dependency; its wheels are not universal
    crc32 = zlib.crc32

__all__ = (
    "FORMAT_VERSION",
    "HEADER_MAGIC",
    "TRAILER_MAGIC",
    "DeviceStreamParser",
    "StreamHeader",
    "StreamTrailer",
    "chunk_count",
    "crc32",
    "device_chunk_count",
    "device_payload_length",
    "round_up",
)

HEADER_MAGIC = b"VDSTRHDR"
TRAILER_MAGIC = b"VDSTRTRL"
FORMAT_VERSION = 2  # 2: the payload check is a CRC-32 (1 had a SHA-256)
FLAG_DISK_LIKE = 0x1

_HEADER = struct.Struct("<8sHH16sHHIII")
_TRAILER = struct.Struct("<8sHH16sHHQQQI")
_CRC = struct.Struct("<I")


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def chunk_count(total_length: int, chunk_size: int) -> int:
    """Chunks of a backup of ``total_length`` bytes."""
    return -(-total_length // chunk_size)


def device_chunk_count(total_length: int, chunk_size: int, devices: int, index: int) -> int:
    """Chunks device ``index`` carries (round-robin by chunk number)."""
    chunks = chunk_count(total_length, chunk_size)
    return chunks // devices + (1 if index < chunks % devices else 0)


def device_payload_length(
    total_length: int, chunk_size: int, block_size: int, devices: int, index: int
) -> int:
    """Payload bytes on device ``index``: its chunks, the last one of the backup padded."""
    chunks = chunk_count(total_length, chunk_size)
    length = device_chunk_count(total_length, chunk_size, devices, index) * chunk_size
    if chunks and (chunks - 1) % devices == index:
        tail = total_length - (chunks - 1) * chunk_size
        length -= chunk_size - round_up(tail, block_size)
    return length


def _problem(message: str, set_name: str | None, device: str | None) -> StreamFormatError:
    return StreamFormatError(message, set_name=set_name, device=device)


class _Block:
    """A header or trailer block: the dataclass fields (``backup_id`` first) after the
    magic, the version and the size, then a CRC-32 of all that (module docstring)."""

    __slots__ = ()  # the blocks are slotted dataclasses
    _LAYOUT: ClassVar[struct.Struct]
    _MAGIC: ClassVar[bytes]
    _NAME: ClassVar[str]
    _MISSING: ClassVar[str]  # what a block without the magic means

    if TYPE_CHECKING:  # what the dataclasses below provide
        __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

        def __init__(self, backup_id: uuid.UUID, *values: int) -> None: ...

    def pack_into(self, block: memoryview) -> None:
        """Write the block into ``block`` (zeroing the rest of it)."""
        backup_id, *values = (getattr(self, f.name) for f in dataclasses.fields(self))
        size = self._LAYOUT.size + _CRC.size
        fields = self._LAYOUT.pack(self._MAGIC, FORMAT_VERSION, size, backup_id.bytes, *values)
        block[: len(fields)] = fields
        block[len(fields) : size] = _CRC.pack(crc32(fields))
        block[size:] = bytes(block.nbytes - size)

    @classmethod
    def unpack(
        cls, block: bytes, *, set_name: str | None = None, device: str | None = None
    ) -> Self:
        size = cls._LAYOUT.size + _CRC.size
        if len(block) < size or block[:8] != cls._MAGIC:
            raise _problem(cls._MISSING, set_name, device)
        fields = block[: cls._LAYOUT.size]
        _, version, field_bytes, backup_id, *values = cls._LAYOUT.unpack(fields)
        if version != FORMAT_VERSION or field_bytes != size:
            raise _problem(f"unsupported stream format version {version}", set_name, device)
        (crc,) = _CRC.unpack_from(block, cls._LAYOUT.size)
        if crc != crc32(fields):
            raise _problem(f"the {cls._NAME} block is corrupt (CRC mismatch)", set_name, device)
        return cls(uuid.UUID(bytes=backup_id), *values)


@dataclasses.dataclass(frozen=True, slots=True)
class StreamHeader(_Block):
    _LAYOUT = _HEADER
    _MAGIC = HEADER_MAGIC
    _NAME = "header"
    _MISSING = "the stream does not start with a header block (not a stream of this engine)"

    backup_id: uuid.UUID
    device_index: int
    device_count: int
    block_size: int
    chunk_size: int
    flags: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class StreamTrailer(_Block):
    _LAYOUT = _TRAILER
    _MAGIC = TRAILER_MAGIC
    _NAME = "trailer"
    _MISSING = "the stream does not end with a trailer block (truncated or incomplete)"

    backup_id: uuid.UUID
    device_index: int
    device_count: int
    total_length: int
    payload_length: int
    chunk_count: int
    payload_crc32: int


class DeviceStreamParser:
    """Reads one device's stream, fed in pieces of any size, without I/O.

    ``feed(data)`` returns the payload bytes that are now known *not* to be the last
    payload block or the trailer, in stream order: ``memoryview`` items are slices of
    ``data`` itself (zero copy: the caller must keep ``data`` valid until it has used
    them), ``bytes`` items are copies the parser held back earlier. It holds back the
    last two blocks it saw, because only the end of the stream tells which block is the
    trailer, and the last payload block is where the final chunk's padding lies.

    ``finish()`` is called at the end of the stream: it checks the length, parses and
    verifies the trailer against the header and the payload it counted and hashed, and
    returns the held-back final payload block (``b""`` for an empty payload) with the
    trailer. Every problem raises ``StreamFormatError`` naming the device.
    """

    def __init__(
        self,
        *,
        block_size: int,
        device_index: int,
        device_count: int,
        set_name: str | None = None,
        device: str | None = None,
    ) -> None:
        self.block_size = block_size
        self.device_index = device_index
        self.device_count = device_count
        self.set_name = set_name
        self.device = device
        self.header: StreamHeader | None = None
        self.stream_bytes = 0
        self.payload_bytes = 0  # emitted so far
        self._head = bytearray()
        self._tail = bytearray()
        self._crc = 0

    def _error(self, message: str) -> StreamFormatError:
        return _problem(message, self.set_name, self.device)

    def _parse_header(self) -> StreamHeader:
        header = StreamHeader.unpack(bytes(self._head), set_name=self.set_name, device=self.device)
        if header.block_size != self.block_size:
            raise self._error(
                f"the backup was written with BLOCKSIZE={header.block_size}, "
                f"this restore uses {self.block_size}"
            )
        if header.device_count != self.device_count:
            raise self._error(
                f"the backup has {header.device_count} device stream(s), "
                f"this restore has {self.device_count} device(s)"
            )
        if header.device_index != self.device_index:
            raise self._error(
                f"this device carries stream {header.device_index} of the backup, "
                f"expected stream {self.device_index} (streams swapped?)"
            )
        if header.chunk_size <= 0 or header.chunk_size % header.block_size:
            raise self._error(f"bad chunk size {header.chunk_size} in the header")
        return header

    def feed(self, data: memoryview) -> list[bytes | memoryview]:
        out: list[bytes | memoryview] = []
        self.stream_bytes += data.nbytes
        if self.header is None:
            take = min(self.block_size - len(self._head), data.nbytes)
            self._head += data[:take]
            data = data[take:]
            if len(self._head) < self.block_size:
                return out
            self.header = self._parse_header()
        keep = 2 * self.block_size
        emit = len(self._tail) + data.nbytes - keep
        if emit <= 0:
            self._tail += data
            return out
        if emit <= len(self._tail):
            out.append(bytes(self._tail[:emit]))
            del self._tail[:emit]
            self._tail += data
        else:
            if self._tail:
                out.append(bytes(self._tail))
            borrowed = emit - len(self._tail)
            out.append(data[:borrowed])
            self._tail = bytearray(data[borrowed:])
        for item in out:
            self._crc = crc32(item, self._crc)
        self.payload_bytes += emit
        return out

    def finish(self) -> tuple[bytes, StreamTrailer]:
        block = self.block_size
        header = self.header
        if header is None:
            raise self._error(
                f"the stream ends after {self.stream_bytes} bytes, before its header block"
            )
        if self.stream_bytes % block:
            raise self._error(
                f"the stream is {self.stream_bytes} bytes long, not a multiple of the "
                f"block size {block} (truncated)"
            )
        if len(self._tail) < block:
            raise self._error("the stream ends right after its header: no trailer block")
        trailer = StreamTrailer.unpack(
            bytes(self._tail[-block:]), set_name=self.set_name, device=self.device
        )
        final = bytes(self._tail[:-block])
        self._tail.clear()
        self._crc = crc32(final, self._crc)
        payload = self.payload_bytes + len(final)
        if trailer.backup_id != header.backup_id:
            raise self._error("the trailer belongs to another backup than the header")
        if (trailer.device_index, trailer.device_count) != (
            header.device_index,
            header.device_count,
        ):
            raise self._error("the trailer names another device stream than the header")
        if trailer.payload_length != payload:
            raise self._error(
                f"the stream carries {payload} payload bytes, its trailer says "
                f"{trailer.payload_length} (truncated or spliced)"
            )
        if trailer.payload_crc32 != self._crc:
            raise self._error("the payload does not match its CRC-32 (corrupt)")
        return final, trailer
