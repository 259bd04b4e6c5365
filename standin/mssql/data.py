"""The stand-in's databases: procedural 8 KiB pages, an LSN, a log, and msdb's backup history.

A page's bytes are a function of (seed, page number, version): a slice of a random pattern
made once per seed, with a 32-byte stamp in front. A database is therefore its seed, size and
the versions of the pages that changed: activity (``write``) gives pages the LSN of its log
record. Everything persists in ``DIR/standin.json`` so a restarted server knows its databases.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import random
import struct
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = (
    "FIRST_LSN",
    "PAGE_SIZE",
    "RUN_PAGES",
    "Database",
    "DbFile",
    "LogRecord",
    "PageImage",
    "Store",
    "StoreError",
    "content_sha256",
    "page_image",
    "stamp",
)

PAGE_SIZE = 8192
RUN_PAGES = 512  # the pattern repeats every 4 MiB; a run of up to 512 pages is one memmove
FIRST_LSN = 25_000_000_008_000_001  # shaped like SQL Server's numeric(25,0) LSNs
_STAMP = struct.Struct("<QQQQ")  # page number, version (LSN), seed, mix
_MIX = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1


def stamp(page: int, version: int, seed: int) -> tuple[int, int, int, int]:
    return page, version, seed & _MASK, ((page * _MIX) ^ version ^ seed) & _MASK


class PageImage:
    """Renders pages of one seed into memory: one memmove per run plus a stamp per page."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        raw = random.Random(seed).randbytes(2 * RUN_PAGES * PAGE_SIZE)
        self._pattern = ctypes.create_string_buffer(raw, len(raw))
        self._addr = ctypes.addressof(self._pattern)

    def render(
        self,
        addr: int,
        view: memoryview,
        offset: int,
        pages: range | list[int],
        versions: dict[int, int],
    ) -> None:
        """Write ``pages`` (in order) at ``view[offset:]`` (``addr`` = address of ``view[0]``)."""
        i = 0
        count = len(pages)
        while i < count:
            first = pages[i]
            run = 1
            while i + run < count and run < RUN_PAGES and pages[i + run] == first + run:
                run += 1
            ctypes.memmove(
                addr + offset + i * PAGE_SIZE,
                self._addr + (first % RUN_PAGES) * PAGE_SIZE,
                run * PAGE_SIZE,
            )
            i += run
        pack = _STAMP.pack_into
        seed = self.seed & _MASK
        get = versions.get
        for k in range(count):
            page = pages[k]
            version = get(page, 0)
            pack(
                view,
                offset + k * PAGE_SIZE,
                page,
                version,
                seed,
                ((page * _MIX) ^ version ^ seed) & _MASK,
            )


@lru_cache(maxsize=8)
def page_image(seed: int) -> PageImage:
    return PageImage(seed)


def content_sha256(seed: int, size_pages: int, versions: dict[int, int]) -> str:
    """SHA-256 of every page of a database, in page order: what a restore must reproduce."""
    image = page_image(seed)
    buf = ctypes.create_string_buffer(RUN_PAGES * PAGE_SIZE)
    addr = ctypes.addressof(buf)
    view = memoryview(buf).cast("B")
    digest = hashlib.sha256()
    for start in range(0, size_pages, RUN_PAGES):
        pages = range(start, min(start + RUN_PAGES, size_pages))
        image.render(addr, view, 0, pages, versions)
        digest.update(view[: len(pages) * PAGE_SIZE])
    return digest.hexdigest()


class StoreError(Exception):
    """A control request the stand-in cannot do (unknown database, name taken, ...)."""


@dataclass
class DbFile:
    logical: str
    physical: str
    type_desc: str  # ROWS or LOG


@dataclass
class LogRecord:
    lsn: int
    time: float  # UTC, seconds since the epoch
    pages: tuple[int, ...]


@dataclass
class Database:
    name: str
    database_id: int
    seed: int
    size_pages: int
    family_guid: str
    files: list[DbFile]
    lsn: int  # last LSN written
    checkpoint_lsn: int
    create_date: float
    state: str = "ONLINE"  # or RESTORING
    versions: dict[int, int] = field(default_factory=dict)  # changed pages only
    log: list[LogRecord] = field(default_factory=list)
    history_base: dict[int, int] = field(default_factory=dict)  # versions before log[0]
    full_ckpt: int | None = None  # checkpoint LSN of the last non-copy-only full backup
    log_chain_lsn: int | None = None  # first LSN of the next log backup
    redo_lsn: int | None = None  # RESTORING: the next LSN a restore must supply
    restore_base_ckpt: int | None = None  # RESTORING: the restored full's checkpoint LSN
    redo_time: float | None = None  # RESTORING: time the restored data reaches

    def log_pages(self, first: int, last: int) -> list[LogRecord]:
        return [r for r in self.log if first <= r.lsn < last]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["versions"] = list(self.versions.items())
        out["history_base"] = list(self.history_base.items())
        out["log"] = [[r.lsn, r.time, list(r.pages)] for r in self.log]
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Database:
        raw = dict(raw)
        raw["files"] = [DbFile(**f) for f in raw["files"]]
        raw["versions"] = {int(p): int(v) for p, v in raw["versions"]}
        raw["history_base"] = {int(p): int(v) for p, v in raw["history_base"]}
        raw["log"] = [LogRecord(int(a), float(b), tuple(c)) for a, b, c in raw["log"]]
        return cls(**raw)


class Store:
    """Databases and msdb.dbo.backupset, persisted in ``DIR/standin.json`` after each change."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "standin.json"
        self.lock = threading.RLock()
        self.databases: dict[str, Database] = {}  # keyed by casefold: names are case-insensitive
        self.msdb: list[dict[str, Any]] = []
        self.next_database_id = 5  # 1-4 are master, tempdb, model, msdb
        self.next_backup_set_id = 1
        self._checksums: dict[tuple[Any, ...], str] = {}
        if self.path.exists():
            raw = json.loads(self.path.read_text())
            self.databases = {d["name"].casefold(): Database.from_json(d) for d in raw["databases"]}
            self.msdb = raw["msdb"]
            self.next_database_id = raw["next_database_id"]
            self.next_backup_set_id = raw["next_backup_set_id"]

    def save(self) -> None:
        with self.lock:
            raw = {
                "databases": [d.to_json() for d in self.databases.values()],
                "msdb": self.msdb,
                "next_database_id": self.next_database_id,
                "next_backup_set_id": self.next_backup_set_id,
            }
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(raw))
            os.replace(tmp, self.path)

    # -- lookups

    def get(self, name: str) -> Database | None:
        return self.databases.get(name.casefold())

    def require(self, name: str) -> Database:
        db = self.get(name)
        if db is None:
            raise StoreError(f"database {name!r} does not exist")
        return db

    def file_owner(self, physical: str) -> Database | None:
        for db in self.databases.values():
            if any(f.physical == physical for f in db.files):
                return db
        return None

    # -- control

    def create(self, name: str, size: int, seed: int) -> Database:
        if size <= 0:
            raise StoreError(f"size of database {name!r} must be positive, got {size}")
        with self.lock:
            if self.get(name) is not None:
                raise StoreError(f"database {name!r} already exists")
            now = time.time()
            db = Database(
                name=name,
                database_id=self.take_database_id(),
                seed=seed,
                size_pages=-(-size // PAGE_SIZE),
                family_guid=str(uuid.uuid4()).upper(),
                files=[
                    DbFile(name, str(self.directory / f"{name}.mdf"), "ROWS"),
                    DbFile(f"{name}_log", str(self.directory / f"{name}_log.ldf"), "LOG"),
                ],
                lsn=FIRST_LSN,
                checkpoint_lsn=FIRST_LSN,
                create_date=now,
            )
            self.databases[name.casefold()] = db
            self.save()
            return db

    def take_database_id(self) -> int:
        with self.lock:
            self.next_database_id += 1
            return self.next_database_id - 1

    def write(self, name: str, pages: int) -> int:
        """Activity: ``pages`` pages change under one new log record; returns its LSN."""
        with self.lock:
            db = self.require(name)
            if db.state != "ONLINE":
                raise StoreError(f"database {name!r} is {db.state}, not ONLINE")
            lsn = db.lsn + 1
            rng = random.Random(f"{db.seed}:{lsn}")
            chosen = tuple(sorted(rng.sample(range(db.size_pages), min(pages, db.size_pages))))
            for page in chosen:
                db.versions[page] = lsn
            db.log.append(LogRecord(lsn, time.time(), chosen))
            db.lsn = lsn
            self.save()
            return lsn

    def drop(self, name: str) -> None:
        with self.lock:
            self.require(name)
            del self.databases[name.casefold()]
            self.save()

    def checksum(self, name: str) -> str:
        with self.lock:
            db = self.require(name)
            return self._content(db.seed, db.size_pages, dict(db.versions))

    def checksum_at(self, name: str, when: float) -> str:
        with self.lock:
            db = self.require(name)
            versions = dict(db.history_base)
            for record in db.log:
                if record.time <= when:
                    for page in record.pages:
                        versions[page] = record.lsn
            return self._content(db.seed, db.size_pages, versions)

    def _content(self, seed: int, size_pages: int, versions: dict[int, int]) -> str:
        key = (seed, size_pages, tuple(sorted(versions.items())))
        if key not in self._checksums:
            self._checksums[key] = content_sha256(seed, size_pages, versions)
        return self._checksums[key]

    def history(self, name: str) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(r) for r in self.msdb if r["database_name"].casefold() == name.casefold()]

    def find_backup(self, guid: str) -> dict[str, Any] | None:
        with self.lock:
            for row in self.msdb:
                if row["backup_set_guid"] == guid:
                    return row
            return None
