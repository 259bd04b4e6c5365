"""The stand-in's backup stream, one per device (media family).

``[header][data][zero pad to BLOCKSIZE][trailer]``: the header is a magic, its length and JSON
(backup set GUID, family index/count, database, type D/I/L, copy-only, LSNs, block size, data
length, ...), padded to a multiple of max(BLOCKSIZE, 8 KiB) so pages stay aligned in transfers;
the trailer repeats the GUID and family and carries the SHA-256 of everything before it. The
data (all pages, changed pages, or log records) is striped over the families in 1 MiB stripes.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import struct
from dataclasses import dataclass, field
from typing import Any

from standin.mssql.data import PAGE_SIZE, LogRecord, page_image, stamp

__all__ = (
    "STRIPE",
    "BackupPlan",
    "FamilyReader",
    "FamilyWriter",
    "StreamDamaged",
    "StreamMalformed",
    "decode_log",
    "encode_log",
    "family_data_length",
    "round_up",
)

STRIPE = 1 << 20
_MAGIC = b"VDSTANDN"
_TRAILER_MAGIC = b"VDSTRAIL"
_PREFIX = struct.Struct("<8sII")  # magic, header length, JSON length
_TRAILER = struct.Struct("<8s36sIIQ32s")  # magic, guid, family, families, data length, sha
_STAMP = struct.Struct("<QQQQ")
_RECORD = struct.Struct("<QdI")


class StreamMalformed(Exception):
    """Not a stream of this stand-in, or cut, or of another backup (Msg 3241)."""


class StreamDamaged(Exception):
    """A page or checksum does not match (Msg 3183)."""

    def __init__(self, page: int, why: str) -> None:
        super().__init__(why)
        self.page = page


def round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def family_data_length(total: int, families: int, family: int) -> int:
    full, rest = divmod(total, STRIPE)
    count = full // families + (1 if family < full % families else 0)
    length = count * STRIPE
    if rest and full % families == family:
        length += rest
    return length


def _global_offset(local: int, families: int, family: int) -> int:
    stripe, within = divmod(local, STRIPE)
    return (stripe * families + family) * STRIPE + within


def encode_log(records: list[LogRecord]) -> bytes:
    out = bytearray()
    for r in records:
        out += _RECORD.pack(r.lsn, r.time, len(r.pages))
        out += struct.pack(f"<{len(r.pages)}I", *r.pages)
    return bytes(out)


def decode_log(blob: bytes) -> list[LogRecord]:
    records: list[LogRecord] = []
    pos = 0
    while pos < len(blob):
        lsn, when, count = _RECORD.unpack_from(blob, pos)
        pos += _RECORD.size
        pages = struct.unpack_from(f"<{count}I", blob, pos)
        pos += 4 * count
        records.append(LogRecord(lsn, when, tuple(pages)))
    if pos != len(blob):
        raise StreamMalformed("log records are cut")
    return records


@dataclass
class BackupPlan:
    """What one BACKUP writes, fixed at its start (a consistent snapshot of the database)."""

    meta: dict[str, Any]  # header fields shared by every family
    families: int
    block_size: int
    pages: range | list[int] = field(default_factory=list)  # data page index -> page number
    versions: dict[int, int] = field(default_factory=dict)
    log_blob: bytes = b""

    @property
    def total(self) -> int:
        if self.meta["type"] == "L":
            return len(self.log_blob)
        return len(self.pages) * PAGE_SIZE


def _header(meta: dict[str, Any], block_size: int) -> bytes:
    body = json.dumps(meta, sort_keys=True).encode()
    length = round_up(_PREFIX.size + len(body), max(block_size, PAGE_SIZE))
    return _PREFIX.pack(_MAGIC, length, len(body)) + body + bytes(length - _PREFIX.size - len(body))


def _trailer_length(block_size: int) -> int:
    return round_up(_TRAILER.size, block_size)


class FamilyWriter:
    """Produces one family's stream, in order, straight into the shared buffers."""

    def __init__(self, plan: BackupPlan, family: int) -> None:
        self.plan = plan
        self.family = family
        self.data_length = family_data_length(plan.total, plan.families, family)
        meta = dict(plan.meta, family=family, families=plan.families)
        meta.update(block_size=plan.block_size, data_length=self.data_length, stripe=STRIPE)
        meta["total_data_length"] = plan.total
        self.header = _header(meta, plan.block_size)
        self.h = len(self.header)
        self.data_end = self.h + self.data_length
        self.pad_end = round_up(self.data_end, plan.block_size)
        self.total = self.pad_end + _trailer_length(plan.block_size)
        self.pos = 0
        self.sha = hashlib.sha256()
        self._trailer: bytes | None = None
        self._image = page_image(plan.meta["seed"]) if plan.meta["type"] != "L" else None

    def reaches_trailer(self, n: int) -> bool:
        return self.pos + n > self.pad_end

    def render(
        self, addr: int, view: memoryview, offset: int, n: int, *, hash: bool = True
    ) -> None:
        """Write the next ``n`` stream bytes at ``view[offset:]``; hash them unless told the
        caller does (in order, before the trailer, which needs the digest of all before it)."""
        if not hash and self.reaches_trailer(n):
            raise AssertionError("the trailer's chunk must be hashed inline")
        end = self.pos + n
        while self.pos < end:
            pos = self.pos
            if pos < self.h:
                take = min(end, self.h) - pos
                view[offset : offset + take] = self.header[pos : pos + take]
            elif pos < self.data_end:
                take = min(end, self.data_end) - pos
                self._data(addr, view, offset, pos - self.h, take)
            elif pos < self.pad_end:
                take = min(end, self.pad_end) - pos
                ctypes.memset(addr + offset, 0, take)
            else:
                if self._trailer is None:
                    self._trailer = self._make_trailer()
                take = end - pos
                start = pos - self.pad_end
                view[offset : offset + take] = self._trailer[start : start + take]
            if hash:
                self.sha.update(view[offset : offset + take])
            self.pos += take
            offset += take

    def _data(self, addr: int, view: memoryview, offset: int, local: int, n: int) -> None:
        plan = self.plan
        while n:
            glob = _global_offset(local, plan.families, self.family)
            piece = min(n, STRIPE - local % STRIPE)
            if self._image is None:
                view[offset : offset + piece] = plan.log_blob[glob : glob + piece]
            else:
                if glob % PAGE_SIZE or piece % PAGE_SIZE:
                    raise AssertionError("page data must stay page-aligned in transfers")
                first = glob // PAGE_SIZE
                pages = plan.pages[first : first + piece // PAGE_SIZE]
                self._image.render(addr, view, offset, pages, plan.versions)
            offset += piece
            local += piece
            n -= piece

    def _make_trailer(self) -> bytes:
        meta = self.plan.meta
        body = _TRAILER.pack(
            _TRAILER_MAGIC,
            meta["guid"].encode(),
            self.family,
            self.plan.families,
            self.data_length,
            self.sha.copy().digest(),
        )
        return body + bytes(_trailer_length(self.plan.block_size) - len(body))

    def digest(self) -> str:
        return self.sha.hexdigest()


class FamilyReader:
    """Checks one family's stream as it arrives (in order) and collects what it restores."""

    def __init__(self) -> None:
        self.head = bytearray()
        self.header: dict[str, Any] | None = None
        self.pos = 0
        self.sha = hashlib.sha256()
        self.pre_trailer: bytes | None = None
        self.trailer = bytearray()
        self.versions: dict[int, int] = {}
        self.pages_seen = 0
        self.log_parts: list[bytes] = []
        self._carry: tuple[int, bytearray] | None = None  # a page stamp cut by a transfer

    @property
    def complete(self) -> bool:
        return self.header is not None and self.pos == self.total

    def feed(self, view: memoryview) -> None:
        i = 0
        n = len(view)
        while i < n:
            rest = view[i:]
            i += self._feed_head(rest) if self.header is None else self._feed_body(rest)

    def _feed_head(self, view: memoryview) -> int:
        need = _PREFIX.size if len(self.head) < _PREFIX.size else self._header_length()
        take = min(len(view), need - len(self.head))
        self.head += view[:take]
        self.sha.update(view[:take])
        self.pos += take
        if len(self.head) == _PREFIX.size:
            self._header_length()
        if len(self.head) >= _PREFIX.size and len(self.head) == self._header_length():
            self._parse_header()
        return take

    def _header_length(self) -> int:
        magic, length, body = _PREFIX.unpack_from(self.head)
        if magic != _MAGIC or body + _PREFIX.size > length or length > 1 << 22:
            raise StreamMalformed("not a backup stream of this server")
        return int(length)

    def _parse_header(self) -> None:
        _, length, body = _PREFIX.unpack_from(self.head)
        try:
            header = json.loads(bytes(self.head[_PREFIX.size : _PREFIX.size + body]))
        except ValueError as exc:
            raise StreamMalformed("damaged header") from exc
        self.header = header
        self.h = length
        self.data_end = length + header["data_length"]
        self.pad_end = round_up(self.data_end, header["block_size"])
        self.total = self.pad_end + _trailer_length(header["block_size"])

    def _feed_body(self, view: memoryview) -> int:
        pos = self.pos
        if pos < self.data_end:
            take = min(len(view), self.data_end - pos)
            self._data(view[:take], pos - self.h)
        elif pos < self.pad_end:
            take = min(len(view), self.pad_end - pos)
        elif pos < self.total:
            if self.pre_trailer is None:
                self.pre_trailer = self.sha.copy().digest()
            take = min(len(view), self.total - pos)
            self.trailer += view[:take]
        else:
            raise StreamMalformed("data after the end of the backup set")
        self.sha.update(view[:take])
        self.pos += take
        return int(take)

    def _data(self, view: memoryview, local: int) -> None:
        header = self.header
        assert header is not None
        if header["type"] == "L":
            self.log_parts.append(bytes(view))
            return
        end = local + len(view)
        if self._carry is not None:
            start, buf = self._carry
            need = _STAMP.size - len(buf)
            buf += view[:need]
            if len(buf) == _STAMP.size:
                self._carry = None
                self._check(bytes(buf), start)
        page_start = round_up(local, PAGE_SIZE)
        for s in range(page_start, end, PAGE_SIZE):
            if end - s >= _STAMP.size:
                self._check(view[s - local : s - local + _STAMP.size], s)
            else:
                self._carry = (s, bytearray(view[s - local :]))

    def _check(self, raw: bytes | memoryview, local: int) -> None:
        header = self.header
        assert header is not None
        page, version, seed, mix = _STAMP.unpack(raw)
        index = _global_offset(local, header["families"], header["family"]) // PAGE_SIZE
        expected = stamp(page, version, header["seed"])
        if (seed, mix) != expected[2:] or page >= header["size_pages"]:
            raise StreamDamaged(index, "page stamp does not match")
        if header["type"] == "D" and page != index:
            raise StreamDamaged(index, "page out of place")
        self.versions[page] = version
        self.pages_seen += 1

    def finish(self) -> None:
        """The stream ended: check it is whole and its trailer matches."""
        if self.header is None or self.pos != self.total:
            raise StreamMalformed("the backup set ended early")
        magic, guid, family, families, length, sha = _TRAILER.unpack_from(self.trailer)
        header = self.header
        if (magic, guid.decode(errors="replace"), family, families, length) != (
            _TRAILER_MAGIC,
            header["guid"],
            header["family"],
            header["families"],
            header["data_length"],
        ):
            raise StreamMalformed("trailer does not match the header")
        if sha != self.pre_trailer:
            raise StreamDamaged(0, "checksum of the backup set does not match")

    def digest(self) -> str:
        return self.sha.hexdigest()
