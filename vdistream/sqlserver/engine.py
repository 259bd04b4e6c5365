"""SQL Server as a job's engine: one T-SQL statement while the job's pumps serve the set.

With our own engines the server side of a set runs inside vdistream; with SQL Server it
is ``sqlservr``, reached through Microsoft's ``libsqlvdi.so``. The job therefore creates
``libsqlvdi.so``'s client set (:meth:`SqlServerEngine.client_set`), and this engine's
``run`` is the statement that makes SQL Server open that set:
``BACKUP ... TO VIRTUAL_DEVICE = N'<set>', ...``, ``RESTORE ... FROM ...`` or
``RESTORE VERIFYONLY``. The statement and the device pumps are one job (spec §6.2-6.4):

* SQL Server refusing or failing the statement (its messages, the reason before 3013)
  raises :class:`SqlServerStatementError`; the job aborts the set, so no device waits.
* An abort of the job signals abort on the set: SQL Server fails the statement, and
  the job's drain deadline cancels ``run`` if it does not: the trigger then stops the
  statement (an attention, or killing ``sqlcmd``) and waits for it to end, shielded
  and bounded. The job closes the set only after ``run`` returned, so SQL Server never
  writes into a closed set.
* Success is SQL Server's word, given only after every device was closed: 3014
  ("successfully processed"), 3262 for VERIFYONLY; a statement that ends without an
  error but without that word is not taken for a success.
* A backup then reads its own row of ``msdb.dbo.backupset`` (type, LSNs, times, the
  server's name and time zone, for chains) and the database's files (for ``MOVE`` on a
  restore elsewhere). SQL Server has recorded the backup by then (and a log backup has
  truncated the log): failing the job now would leave a gap in the chain. So the
  queries are retried, and if they still fail (or msdb keeps no history) the backup is
  kept with what is known (``lsn_error`` says why the LSNs are missing): it restores
  on its own, though no chain can be planned through it.
* Times: msdb and ``STOPAT`` speak the server's local time; the manifest keeps UTC
  (converted with msdb's ``time_zone``), and a ``STOPAT`` is converted back with the
  offset recorded by the backup it applies to.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Sequence
from typing import Any

import anyio

from vdistream.engines.base import (
    Direction,
    Engine,
    EngineError,
    EngineResult,
    device_names,
)
from vdistream.log import get_logger
from vdistream.sqlserver.device_set import SqlVdiDeviceSet
from vdistream.sqlserver.library import library_path, load
from vdistream.sqlserver.trigger import SqlServerError, StatementResult, Trigger, trigger_for
from vdistream.sqlserver.tsql import (
    BACKUP_MODES,
    BackupKind,
    StatementError,
    backup_statement,
    backupset_query,
    files_query,
    restore_statement,
    verifyonly_statement,
)
from vdistream.sqlserver.url import MssqlURL
from vdistream.vdi import ClientSet, Registry

__all__ = (
    "BACKUP_MODES",
    "SqlServerBackup",
    "SqlServerEngine",
    "SqlServerRestore",
    "SqlServerResult",
    "SqlServerStatementError",
    "SqlServerVerify",
    "Transfer",
    "run_statement",
    "server_time",
)


_log = get_logger(__name__)


async def run_statement(
    url: MssqlURL, statement: str, *, query: bool = False, trigger: Trigger | None = None
) -> StatementResult:
    """Run one statement on ``url``'s server (through ``trigger``, default the URL's);
    SQL Server's refusal, or the trigger's refusal to send it (sqlcmd and ``$(``), as
    ``SqlServerStatementError`` with the password removed: one translation for every
    statement vdistream sends."""
    try:
        return await (trigger or trigger_for(url)).run(statement, query=query)
    except SqlServerError as exc:
        raise SqlServerStatementError(url.redact(str(exc)), numbers=exc.numbers) from exc
    except StatementError as exc:
        raise SqlServerStatementError(url.redact(str(exc))) from exc


class SqlServerStatementError(EngineError):
    """SQL Server refused or failed the statement: its own messages, the reason first,
    then the statement (its password removed). ``numbers`` are SQL Server's message
    numbers (``911``, ``3013``, ...)."""

    def __init__(self, message: str, *, numbers: Sequence[int] = ()) -> None:
        self.numbers = tuple(numbers)
        super().__init__(message)


@dataclasses.dataclass(frozen=True)
class Transfer:
    """The statement's transfer options, which are also the set's configuration:
    ``BLOCKSIZE``, ``MAXTRANSFERSIZE`` and ``BUFFERCOUNT`` (total, shared by every
    device; ``None``: two per device)."""

    block_size: int = 65536
    max_transfer_size: int = 1024 * 1024
    buffer_count: int | None = None

    def buffers(self, devices: int) -> int:
        return self.buffer_count if self.buffer_count is not None else 2 * devices


@dataclasses.dataclass(frozen=True, slots=True)
class SqlServerResult(EngineResult):
    """An ``EngineResult`` with what SQL Server recorded of a backup (msdb's row, the
    database's files); ``None`` for restores and verifications."""

    sqlserver: dict[str, Any] | None = None


class SqlServerEngine(Engine):
    """One statement on one SQL Server for one job (module docstring).

    ``library`` is the ``sqlvdi`` setting (``None``: ``VDISTREAM_SQLVDI``, then
    ``/opt/mssql/lib/libsqlvdi.so``); ``umask`` the one the set is created with, so
    that SQL Server (user ``mssql``) can open its shared memory; ``trigger`` how the
    statement reaches SQL Server (default: from the URL, python-tds or ``sqlcmd``).
    """

    def __init__(
        self,
        url: MssqlURL,
        direction: Direction,
        devices: int,
        transfer: Transfer,
        *,
        library: str | None = None,
        umask: int | None = 0o007,
        trigger: Trigger | None = None,
    ) -> None:
        self.url = url
        self._direction = direction
        self.devices = devices
        self.transfer = transfer
        self._library = library
        self._umask = umask
        self.trigger = trigger if trigger is not None else trigger_for(url)

    @property
    def direction(self) -> Direction:
        return self._direction

    def client_set(self, registry: Registry | None = None) -> ClientSet:
        """``libsqlvdi.so``'s client set (``registry`` is ours and not used: SQL Server
        meets the set by name in its shared memory)."""
        return SqlVdiDeviceSet(load(library_path(self._library)), umask=self._umask)

    #: the message SQL Server ends a successful statement of this engine with
    success = 3014

    def statement(self, devices: list[str]) -> str:
        """The T-SQL that makes SQL Server open the set whose devices are ``devices``."""
        raise NotImplementedError

    def check(self) -> None:
        """Refuse now, before any set exists, what would fail once the job runs: the
        library (``SqlVdiLibraryError`` naming the path or the symbol) and the statement
        (``StatementError``: a name or an option SQL Server cannot take)."""
        load(library_path(self._library))
        self.statement(device_names("vdistream-check", self.devices))

    async def run(self, set_name: str, *, registry: Registry | None = None) -> EngineResult:
        statement = self.statement(device_names(set_name, self.devices))
        _log.info("sqlserver_statement", statement=self.url.redact(statement))
        result = await self.execute(statement)
        if not result.has(self.success):
            raise SqlServerStatementError(
                f"SQL Server ended the statement without reporting success (message "
                f"{self.success}); nothing is kept",
                numbers=[m.number for m in result.messages],
            )
        return SqlServerResult(
            direction=self.direction,
            set_name=set_name,
            devices=(),
            logical_bytes=0,
            sqlserver=await self.after(result),
        )

    async def execute(self, statement: str, *, query: bool = False) -> StatementResult:
        """Run one statement; SQL Server's failure as ``SqlServerStatementError``."""
        return await run_statement(self.url, statement, query=query, trigger=self.trigger)

    async def after(self, result: StatementResult) -> dict[str, Any] | None:
        """What to record once the statement succeeded (backups: msdb's row)."""
        return None


class SqlServerBackup(SqlServerEngine):
    """``BACKUP DATABASE|LOG`` of ``url.database`` (``mode``: full, diff, log,
    copy-only), named ``backup_id`` in msdb so its row is found again."""

    def __init__(
        self,
        url: MssqlURL,
        devices: int,
        transfer: Transfer,
        *,
        mode: str,
        backup_id: str,
        checksum: bool = True,
        copy_only: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(url, Direction.BACKUP, devices, transfer, **kwargs)
        if mode not in BACKUP_MODES:
            raise ValueError(f"mode {mode!r}: one of {', '.join(BACKUP_MODES)}")
        self.mode = mode
        self.kind = {"diff": BackupKind.DIFF, "log": BackupKind.LOG}.get(mode, BackupKind.FULL)
        self.copy_only = copy_only or mode == "copy-only"
        self.backup_id = backup_id
        self.checksum = checksum

    def statement(self, devices: list[str]) -> str:
        return backup_statement(
            self.url.database,
            devices,
            kind=self.kind,
            copy_only=self.copy_only,
            checksum=self.checksum,
            block_size=self.transfer.block_size,
            buffer_count=self.transfer.buffers(self.devices),
            max_transfer_size=self.transfer.max_transfer_size,
            name=self.backup_id,
        )

    #: how often msdb is asked after a success, and the pause before each retry
    history_attempts = 3
    history_pause = 1.0

    async def after(self, result: StatementResult) -> dict[str, Any] | None:
        """What msdb and ``sys.master_files`` say of the backup just taken; what is
        known from the statement when they cannot be read (module docstring)."""
        database = self.url.database
        known: dict[str, Any] = {
            "database": database,
            "type": {BackupKind.DIFF: "I", BackupKind.LOG: "L"}.get(self.kind, "D"),
            "copy_only": self.copy_only,
            "server": f"{self.url.host},{self.url.port}",
        }
        problem = ""
        for attempt in range(self.history_attempts):
            if attempt:
                await anyio.sleep(self.history_pause * attempt)
            try:
                query = backupset_query(database, self.backup_id)
                rows = (await self.execute(query, query=True)).rows
                files = (await self.execute(files_query(database), query=True)).rows
            except SqlServerStatementError as exc:
                problem = str(exc)
                continue
            if not rows or len(rows[0]) < 10:
                problem = f"msdb.dbo.backupset has no row named {self.backup_id!r}"
                continue
            return {**known, **_history(rows[0]), "files": _files(files)}
        _log.error("sqlserver_history_unread", database=database, error=problem)
        return {**known, "lsn_error": problem}


class SqlServerRestore(SqlServerEngine):
    """``RESTORE DATABASE|LOG`` into ``url.database``."""

    def __init__(
        self,
        url: MssqlURL,
        devices: int,
        transfer: Transfer,
        *,
        log: bool = False,
        replace: bool = False,
        recovery: bool = True,
        moves: Sequence[tuple[str, str]] = (),
        stopat: datetime.datetime | None = None,
        checksum: bool = True,
        time_zone_minutes: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(url, Direction.RESTORE, devices, transfer, **kwargs)
        self.time_zone_minutes = time_zone_minutes
        self.log = log
        self.replace = replace
        self.recovery = recovery
        self.moves = tuple(moves)
        self.stopat = stopat
        self.checksum = checksum

    def statement(self, devices: list[str]) -> str:
        return restore_statement(
            self.url.database,
            devices,
            log=self.log,
            replace=self.replace,
            recovery=self.recovery,
            moves=self.moves,
            stopat=None
            if self.stopat is None
            else server_time(self.stopat, self.time_zone_minutes),
            checksum=self.checksum,
            block_size=self.transfer.block_size,
            buffer_count=self.transfer.buffers(self.devices),
            max_transfer_size=self.transfer.max_transfer_size,
        )


class SqlServerVerify(SqlServerEngine):
    """``RESTORE VERIFYONLY``: SQL Server's own check of a backup, streamed back."""

    success = 3262  # "The backup set on file 1 is valid."

    def __init__(
        self, url: MssqlURL, devices: int, transfer: Transfer, *, checksum: bool = True, **kw: Any
    ) -> None:
        super().__init__(url, Direction.RESTORE, devices, transfer, **kw)
        self.checksum = checksum

    def statement(self, devices: list[str]) -> str:
        return verifyonly_statement(
            devices,
            checksum=self.checksum,
            block_size=self.transfer.block_size,
            buffer_count=self.transfer.buffers(self.devices),
            max_transfer_size=self.transfer.max_transfer_size,
        )


def _history(row: Sequence[str | None]) -> dict[str, Any]:
    """One row of ``backupset_query`` as the manifest records it."""
    offset = _offset(row[10] if len(row) > 10 else None)
    record: dict[str, Any] = {
        "type": row[0],
        "copy_only": row[1] in ("1", "True", "true"),
        "first_lsn": row[2],
        "last_lsn": row[3],
        "checkpoint_lsn": row[4],
        "database_backup_lsn": row[5],
        "differential_base_lsn": row[6],
        "started": _utc(row[7], offset),
        "finished": _utc(row[8], offset),
        "time_zone_minutes": int(offset.total_seconds() // 60),
    }
    if len(row) > 11 and row[11]:
        record["server"] = row[11]  # @@SERVERNAME: the same server whatever the URL says
    return record


def _files(rows: Sequence[Sequence[str | None]]) -> list[dict[str, str | None]]:
    return [{"logical": f[0], "physical": f[1], "type": f[2]} for f in rows if len(f) >= 3]


def _offset(time_zone: str | None) -> datetime.timedelta:
    """msdb's ``time_zone`` (15-minute steps; 127 or NULL: unknown, taken as UTC)."""
    try:
        steps = int(time_zone) if time_zone is not None else 0
    except ValueError:
        steps = 0
    return datetime.timedelta(minutes=15 * steps) if abs(steps) <= 56 else datetime.timedelta()


def _utc(text: str | None, offset: datetime.timedelta) -> str | None:
    """msdb's local date (ISO 8601, no zone) as an aware UTC ISO string."""
    if not text:
        return None
    when = datetime.datetime.fromisoformat(text)
    if when.tzinfo is None:
        when = (when - offset).replace(tzinfo=datetime.UTC)
    return when.astimezone(datetime.UTC).isoformat()


def server_time(when: datetime.datetime, offset_minutes: int) -> datetime.datetime:
    """An aware time as the server's local clock reads it (what ``STOPAT`` takes)."""
    utc = when.astimezone(datetime.UTC).replace(tzinfo=None)
    return utc + datetime.timedelta(minutes=offset_minutes)
