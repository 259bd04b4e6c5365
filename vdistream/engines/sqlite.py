"""SQLite: consistent online backups of a database file, restores checked before use.

Backup (``SQLiteBackup(path)``): once the set is configured, SQLite's online backup
API (``sqlite3.Connection.backup``) copies the live database into a temporary file in
a fresh temporary directory (``tempdir``, default the system's), in a worker thread;
that file is then streamed into the devices (``FileProducer``, striped and framed by
the striping engine). The copy is made in ONE backup step, i.e. inside one read
transaction, so it is a transaction-consistent snapshot even while other connections
or processes write: in WAL mode writers go on meanwhile and the copy holds exactly
the transactions committed when it started; in rollback-journal mode writers wait for
the copy (SQLite's own locking). A stepped copy would restart on every foreign write
and might never finish under a steady writer. The temporary directory
(``vdistream-sqlite-*``) is removed when the job ends, however it ends; it holds an
owner lock for its whole life (``vdistream.engines.workdir``), so that when the job is
killed (``kill -9``) the next SQLite backup using the same temporary directory removes
it (``debris_removed`` in the log), and never the directory of a live job. The copy
cannot be interrupted once started: an abort or cancellation during it takes effect
when it is done (bounded by the size of the database). Until the first byte flows the
devices are idle: the job's ``stall_timeout`` must exceed the copy's duration for very
large databases.

Restore (``SQLiteRestore(target)``): the stream is written to a temporary file next
to ``target``; when the stream is complete and verified, the file must start with
SQLite's header and pass ``PRAGMA integrity_check``; only then is it put in place.
An existing ``target`` is never replaced (``TargetExistsError``, checked before the
set opens and again atomically at the end) unless ``overwrite=True``. A ``-wal`` or
``-journal`` file beside ``target`` (the database is open, was not closed cleanly, or
was deleted without its journal) is refused in every case: SQLite would apply that
journal to the restored file. A stale ``-shm`` alone is removed.

Errors (``SQLiteError``, ``TargetExistsError``) name the database's path.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.to_thread

from vdistream.engines.faults import FailPoint
from vdistream.engines.files import AtomicFileConsumer, creation_mode
from vdistream.engines.scoped import (
    EndpointError,
    ScopedBackup,
    ScopedRestore,
    ScopedStream,
    TargetExistsError,
)
from vdistream.engines.streams import ByteProducer, FileProducer
from vdistream.engines.striping import StripingOptions
from vdistream.engines.workdir import claim_workdir, release_workdir, sweep_workdir
from vdistream.log import get_logger
from vdistream.ownership import OwnerLock

__all__ = (
    "SQLITE_HEADER",
    "SQLiteBackup",
    "SQLiteError",
    "SQLiteRestore",
    "SQLiteSnapshotProducer",
    "database_info",
    "integrity_check",
    "snapshot",
)

SQLITE_HEADER = b"SQLite format 3\x00"
#: How long the snapshot's connection waits for a lock (rollback-journal writers).
BUSY_TIMEOUT_SECONDS = 60.0
#: How many problems ``integrity_check`` reports at most.
MAX_PROBLEMS = 10
#: The name of every snapshot directory starts with this.
SNAPSHOT_PREFIX = "vdistream-sqlite-"

_log = get_logger(__name__)


class SQLiteError(EndpointError):
    """A SQLite database could not be read, written or checked; ``path`` names it."""

    def __init__(self, message: str, *, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        super().__init__(message)


def _uri(path: Path, **params: str) -> str:
    query = "&".join(f"{key}={value}" for key, value in params.items())
    return f"{path.absolute().as_uri()}?{query}"


def snapshot(source: str | os.PathLike[str], dest: str | os.PathLike[str]) -> int:
    """Copy the live database ``source`` into the new file ``dest``; its size in bytes.

    One backup step inside one read transaction (module docstring). Blocking: call it
    in a worker thread.
    """
    source = Path(source)
    if not source.is_file():
        raise SQLiteError(f"no SQLite database at {source}", path=source)
    try:
        # mode=rw: never create a database where there was none; a hot journal of a
        # crashed writer is rolled back on open, as SQLite does for every reader.
        src = sqlite3.connect(_uri(source, mode="rw"), uri=True, timeout=BUSY_TIMEOUT_SECONDS)
    except sqlite3.Error as exc:
        raise SQLiteError(f"cannot open the database {source}: {exc}", path=source) from exc
    try:
        dst = sqlite3.connect(os.fspath(dest))
        try:
            src.backup(dst, pages=-1)
        finally:
            dst.close()
    except sqlite3.Error as exc:
        raise SQLiteError(f"cannot back up the database {source}: {exc}", path=source) from exc
    finally:
        src.close()
    return Path(dest).stat().st_size


def integrity_check(
    path: str | os.PathLike[str],
    *,
    name: str | os.PathLike[str] | None = None,
    what: str = "the database",
) -> str:
    """``"ok"`` if ``path`` is a SQLite database passing ``PRAGMA integrity_check``.

    Raises ``SQLiteError`` naming ``name`` (default ``path``; ``what`` says what it is)
    with SQLite's own findings otherwise. Opens the file read-only and immutable: nothing is written
    next to it. Blocking: call it in a worker thread.
    """
    path = Path(path)
    shown = Path(name) if name is not None else path
    try:
        with path.open("rb") as file:
            header = file.read(len(SQLITE_HEADER))
    except OSError as exc:
        raise SQLiteError(f"cannot read {shown}: {exc.strerror}", path=shown) from exc
    if header != SQLITE_HEADER:
        raise SQLiteError(
            f"{what} {shown} is not a SQLite database (it does not start with SQLite's header)",
            path=shown,
        )
    try:
        connection = sqlite3.connect(_uri(path, mode="ro", immutable="1"), uri=True)
        try:
            rows = connection.execute(f"PRAGMA integrity_check({MAX_PROBLEMS})").fetchall()
        finally:
            connection.close()
    except sqlite3.Error as exc:
        raise SQLiteError(f"{what} {shown} fails integrity_check: {exc}", path=shown) from exc
    problems = [str(row[0]) for row in rows]
    if problems != ["ok"]:
        raise SQLiteError(
            f"{what} {shown} fails integrity_check: {'; '.join(problems)}", path=shown
        )
    return "ok"


def database_info(path: str | os.PathLike[str]) -> dict[str, str]:
    """What the header of the database file says (page size, pages, journal mode).

    Reads the first 100 bytes only, without locking: describing never disturbs the
    database. Blocking: call it in a worker thread.
    """
    path = Path(path)
    try:
        with path.open("rb") as file:
            header = file.read(100)
        size = path.stat().st_size
    except OSError as exc:
        raise SQLiteError(f"cannot read {path}: {exc.strerror}", path=path) from exc
    if len(header) < 100 or not header.startswith(SQLITE_HEADER):
        raise SQLiteError(f"{path} is not a SQLite database", path=path)
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    return {
        "path": str(path),
        "size_bytes": str(size),
        "page_size": str(page_size),
        "page_count": str(int.from_bytes(header[28:32], "big")),
        "journal_mode": "wal" if header[18] == 2 else "rollback",
        "sqlite_version": sqlite3.sqlite_version,
    }


# --- backup --------------------------------------------------------------------------


class SQLiteSnapshotProducer(ByteProducer, ScopedStream):
    """The bytes of a consistent snapshot of ``path`` (module docstring).

    The snapshot is taken at the first ``readinto``; ``snapshot_bytes`` is its size.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, tempdir: str | os.PathLike[str] | None = None
    ) -> None:
        self.path = Path(path).absolute()
        self.tempdir = tempdir
        self.snapshot_bytes: int | None = None
        self.snapshot_path: Path | None = None
        self.busy = False
        self._workdir: Path | None = None
        self._file: FileProducer | None = None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        # Shielded: a cancellation must not lose a directory made in the worker thread.
        with anyio.CancelScope(shield=True):
            self._workdir, lock = await anyio.to_thread.run_sync(self._prepare)
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                await self.aclose()
                workdir, self._workdir = self._workdir, None
                assert workdir is not None
                await anyio.to_thread.run_sync(release_workdir, workdir, lock)

    def _prepare(self) -> tuple[Path, OwnerLock]:
        if not self.path.is_file():
            raise SQLiteError(f"no SQLite database at {self.path}", path=self.path)
        # What killed backups left in the same temporary directory (module docstring).
        sweep_workdir(self.tempdir, SNAPSHOT_PREFIX)
        try:
            return claim_workdir(self.tempdir, SNAPSHOT_PREFIX)
        except OSError as exc:
            raise SQLiteError(
                f"cannot create a temporary directory for the snapshot of {self.path}: "
                f"{exc.strerror}",
                path=self.path,
            ) from exc

    async def readinto(self, view: memoryview) -> int:
        if self._file is None:
            if self._workdir is None:
                raise RuntimeError("SQLiteSnapshotProducer used outside its running() scope")
            target = self._workdir / self.path.name
            self.busy = True  # the snapshot moves no bytes yet: tell the stall watchdog
            try:
                self.snapshot_bytes = await anyio.to_thread.run_sync(snapshot, self.path, target)
            finally:
                self.busy = False
            self.snapshot_path = target
            _log.info("sqlite_snapshot_taken", path=str(self.path), bytes=self.snapshot_bytes)
            self._file = FileProducer(target)
        return await self._file.readinto(view)

    async def aclose(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            await file.aclose()


class SQLiteBackup(ScopedBackup):
    """A consistent online backup of the SQLite database ``path`` (module docstring)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        options: StripingOptions | None = None,
        *,
        tempdir: str | os.PathLike[str] | None = None,
        fail_at: FailPoint | None = None,
        backup_id: uuid.UUID | None = None,
    ) -> None:
        self.snapshot = SQLiteSnapshotProducer(path, tempdir=tempdir)
        self.path = self.snapshot.path
        super().__init__(self.snapshot, options, fail_at=fail_at, backup_id=backup_id)


# --- restore -------------------------------------------------------------------------


def _refuse_stale_journals(target: Path) -> None:
    """No journal of an old database may stay beside the restored one.

    SQLite would apply a ``-wal`` or hot ``-journal`` found beside the file to it, even
    one left behind by a database that was deleted: the restore would be corrupted.
    """
    for suffix in ("-wal", "-journal"):
        companion = target.with_name(target.name + suffix)
        if companion.exists():
            raise TargetExistsError(
                f"the database {target} has a {suffix} file beside it: it is open or was not "
                "closed cleanly, and that journal would be applied to the restored file; "
                "close it (or remove the journal) first"
            )
    with contextlib.suppress(FileNotFoundError):
        target.with_name(target.name + "-shm").unlink()  # a stale index of no WAL


class SQLiteRestore(ScopedRestore):
    """A restore into the database file ``target``, checked before use (module docstring)."""

    def __init__(
        self,
        target: str | os.PathLike[str],
        options: StripingOptions | None = None,
        *,
        overwrite: bool = False,
        file_mode: int | None = None,
        fail_at: FailPoint | None = None,
    ) -> None:
        self.target = Path(target).absolute()
        self.checked: str | None = None
        # The source's mode within our umask; unknown (an older backup): owner only,
        # since a database may hold secrets.
        mode = (0o600 if file_mode is None else file_mode) & creation_mode()
        self.file = AtomicFileConsumer(
            self.target,
            mode=mode,
            overwrite=overwrite,
            validate=self._validate,
            before_place=self._before_place,
            precheck=lambda: _refuse_stale_journals(self.target),
            what="SQLite database",
        )
        super().__init__(self.file, options, fail_at=fail_at)

    def _validate(self, temp: Path) -> None:
        self.checked = integrity_check(temp, name=self.target, what="the restored database")

    def _before_place(self, temp: Path) -> None:
        del temp
        _refuse_stale_journals(self.target)
