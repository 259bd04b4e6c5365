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
* Success is SQL Server's word (3014), given only after every device was closed; a
  backup then reads its own row of ``msdb.dbo.backupset`` (its type and LSNs, for
  chains) and the database's files (for ``MOVE`` on a restore elsewhere).
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Sequence
from typing import Any

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
    BackupKind,
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
)

#: ``--mode`` of a SQL Server backup: the statement's kind, and copy-only
BACKUP_MODES = ("full", "diff", "log", "copy-only")

_log = get_logger(__name__)


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

    def statement(self, devices: list[str]) -> str:
        """The T-SQL that makes SQL Server open the set whose devices are ``devices``."""
        raise NotImplementedError

    async def run(self, set_name: str, *, registry: Registry | None = None) -> EngineResult:
        statement = self.statement(device_names(set_name, self.devices))
        _log.info("sqlserver_statement", statement=self.url.redact(statement))
        result = await self.execute(statement)
        return SqlServerResult(
            direction=self.direction,
            set_name=set_name,
            devices=(),
            logical_bytes=0,
            sqlserver=await self.after(result),
        )

    async def execute(self, statement: str, *, query: bool = False) -> StatementResult:
        """Run one statement; SQL Server's failure as ``SqlServerStatementError``."""
        try:
            return await self.trigger.run(statement, query=query)
        except SqlServerError as exc:
            raise SqlServerStatementError(
                f"SQL Server: {self.url.redact(str(exc))}", numbers=exc.numbers
            ) from exc

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

    async def after(self, result: StatementResult) -> dict[str, Any] | None:
        database = self.url.database
        rows = (await self.execute(backupset_query(database, self.backup_id), query=True)).rows
        if not rows:
            raise SqlServerStatementError(
                f"SQL Server reported the backup of {database!r} complete but msdb has no "
                f"row named {self.backup_id!r} (msdb.dbo.backupset)"
            )
        row = rows[0]
        files = (await self.execute(files_query(database), query=True)).rows
        return {
            "database": database,
            "type": row[0],
            "copy_only": row[1] in ("1", "True", "true"),
            "first_lsn": row[2],
            "last_lsn": row[3],
            "checkpoint_lsn": row[4],
            "database_backup_lsn": row[5],
            "differential_base_lsn": row[6],
            "started": _utc(row[7]),
            "finished": _utc(row[8]),
            "server": f"{self.url.host},{self.url.port}",
            "files": [
                {"logical": f[0], "physical": f[1], "type": f[2]} for f in files if len(f) >= 3
            ],
        }


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
        **kwargs: Any,
    ) -> None:
        super().__init__(url, Direction.RESTORE, devices, transfer, **kwargs)
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
            stopat=self.stopat,
            checksum=self.checksum,
            block_size=self.transfer.block_size,
            buffer_count=self.transfer.buffers(self.devices),
            max_transfer_size=self.transfer.max_transfer_size,
        )


class SqlServerVerify(SqlServerEngine):
    """``RESTORE VERIFYONLY``: SQL Server's own check of a backup, streamed back."""

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


def _utc(text: str | None) -> str | None:
    """msdb's date (ISO 8601, UTC by our convention) as an aware ISO string."""
    if not text:
        return None
    when = datetime.datetime.fromisoformat(text)
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.isoformat()
