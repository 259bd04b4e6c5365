"""The T-SQL text that makes SQL Server open a virtual device set, and the queries.

Every builder returns ONE statement, in the exact form the project fixes (``Contract B``
in the issue's rules; spec §6.1): keywords upper case, single spaces, the options after
``WITH`` joined by ``", "``, identifiers quoted as ``QUOTENAME`` does (``[name]`` with
``]`` doubled), strings as ``N'...'`` with ``'`` doubled. Nothing a user gives (a
database name, a logical file name, a path, a backup id) can end a string or an
identifier early, so a database named ``x]; DROP DATABASE y; --`` is backed up, and
nothing else happens.

The devices are the set's device names in order (``device_names``): device 0 is the
set's name (SQL Server finds the set by its first ``VIRTUAL_DEVICE`` clause), then the
set name followed by ``1``, ``2``, ...

The VDI options must match the set's configuration (spec §6.1): ``BLOCKSIZE`` a power of
two in 512..65536, ``MAXTRANSFERSIZE`` a multiple of 64 KiB in 64 KiB..4 MiB,
``BUFFERCOUNT`` at least 1. A value outside is refused here, with one line naming it,
rather than by SQL Server after the set was created. ``STOPAT`` is written in UTC, ISO
8601 without a zone, to the second: an aware time is converted, a naive one is taken as
UTC already.
"""

from __future__ import annotations

import datetime as _dt
import enum
from collections.abc import Sequence

from vdistream.errors import ConfigError

__all__ = (
    "BACKUP_MODES",
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_BUFFER_COUNT",
    "DEFAULT_MAX_TRANSFER_SIZE",
    "MAX_DEVICES",
    "BackupKind",
    "StatementError",
    "backup_statement",
    "backupset_query",
    "database_query",
    "device_names",
    "filelistonly_statement",
    "files_query",
    "format_stopat",
    "headeronly_statement",
    "quote_name",
    "quote_string",
    "restore_statement",
    "verifyonly_statement",
    "version_query",
)

#: ``--mode`` of a SQL Server backup: the statement's kind, and copy-only (defined here,
#: in a module that loads nothing, for the command line and the daemon's requests)
BACKUP_MODES = ("full", "diff", "log", "copy-only")

DEFAULT_BLOCK_SIZE = 65536
DEFAULT_BUFFER_COUNT = 8
DEFAULT_MAX_TRANSFER_SIZE = 1048576
#: SQL Server accepts at most 64 backup devices in one statement.
MAX_DEVICES = 64
#: QUOTENAME's argument is nvarchar(128): longer input gives NULL.
_NAME_LIMIT = 128


class StatementError(ConfigError, ValueError):
    """A T-SQL statement cannot be built from these values (the message names which)."""


class BackupKind(enum.StrEnum):
    """What a BACKUP statement copies: the whole database, the changes since the last
    full backup, or the transaction log."""

    FULL = "FULL"
    DIFF = "DIFF"
    LOG = "LOG"


# --- quoting --------------------------------------------------------------------------


def _utf16_units(text: str) -> int:
    # SQL Server counts nvarchar length in UTF-16 code units, not code points.
    return len(text.encode("utf-16-le")) // 2


def quote_name(name: str | None) -> str:
    """``QUOTENAME(name)`` with brackets: ``[name]``, every ``]`` doubled.

    ``None`` or more than 128 UTF-16 code units (where QUOTENAME returns NULL) and a NUL
    character (it cannot travel on a command line) raise ``StatementError``, a
    ``ValueError``, naming the value.
    """
    if name is None:
        raise StatementError("cannot quote a NULL name (QUOTENAME would return NULL)")
    if not isinstance(name, str):
        raise StatementError(f"cannot quote {name!r}: a name is a string")
    if _utf16_units(name) > _NAME_LIMIT:
        raise StatementError(
            f"name {name[:40]!r}... is longer than {_NAME_LIMIT} characters "
            "(SQL Server's limit for identifiers)"
        )
    if "\x00" in name:
        raise StatementError(f"name {name!r} contains a NUL character")
    return "[" + name.replace("]", "]]") + "]"


def quote_string(text: str) -> str:
    """A Unicode string literal: ``N'text'`` with every ``'`` doubled (no NUL allowed)."""
    if not isinstance(text, str):
        raise StatementError(f"cannot quote {text!r}: not a string")
    if "\x00" in text:
        raise StatementError(f"string {text!r} contains a NUL character")
    return "N'" + text.replace("'", "''") + "'"


# --- options --------------------------------------------------------------------------


def device_names(set_name: str, count: int) -> tuple[str, ...]:
    """The names of a set's ``count`` devices: the set's name, then ``set_name + "1"``,
    ``+ "2"``, ... (the first device names the set)."""
    if not set_name:
        raise StatementError("a virtual device set needs a name")
    if not 1 <= count <= MAX_DEVICES:
        raise StatementError(f"device count {count} is not in 1..{MAX_DEVICES}")
    return (set_name, *(f"{set_name}{index}" for index in range(1, count)))


def _devices(devices: Sequence[str]) -> str:
    if isinstance(devices, str):
        raise StatementError(f"devices must be a list of names, not the string {devices!r}")
    if not 1 <= len(devices) <= MAX_DEVICES:
        raise StatementError(f"{len(devices)} devices: SQL Server takes 1..{MAX_DEVICES}")
    seen: set[str] = set()
    for name in devices:
        if not name:
            raise StatementError("a virtual device name is empty")
        if name in seen:
            raise StatementError(f"virtual device {name!r} is named twice")
        seen.add(name)
    return ", ".join(f"VIRTUAL_DEVICE = {quote_string(name)}" for name in devices)


def _database(database: str) -> str:
    if not database:
        raise StatementError("the database name is empty")
    return quote_name(database)


def _transfer(block_size: int, buffer_count: int, max_transfer_size: int) -> list[str]:
    """``BLOCKSIZE``, ``BUFFERCOUNT``, ``MAXTRANSFERSIZE``, validated (module docstring)."""
    for label, value in (
        ("BLOCKSIZE", block_size),
        ("BUFFERCOUNT", buffer_count),
        ("MAXTRANSFERSIZE", max_transfer_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int):
            raise StatementError(f"{label} = {value!r} is not an integer")
    if not (512 <= block_size <= 65536 and block_size & (block_size - 1) == 0):
        raise StatementError(
            f"BLOCKSIZE = {block_size} is not a power of 2 between 512 and 65536 bytes"
        )
    if buffer_count < 1:
        raise StatementError(f"BUFFERCOUNT = {buffer_count} is less than 1")
    if not (65536 <= max_transfer_size <= 4194304 and max_transfer_size % 65536 == 0):
        raise StatementError(
            f"MAXTRANSFERSIZE = {max_transfer_size} is not a multiple of 65536 between "
            "65536 and 4194304 bytes"
        )
    return [
        f"BLOCKSIZE = {block_size}",
        f"BUFFERCOUNT = {buffer_count}",
        f"MAXTRANSFERSIZE = {max_transfer_size}",
    ]


def format_stopat(when: _dt.datetime) -> str:
    """``STOPAT``'s text: UTC, ISO 8601 without a zone, whole seconds (an aware time is
    converted to UTC; a naive one is taken as UTC)."""
    if not isinstance(when, _dt.datetime):
        raise StatementError(f"STOPAT {when!r} is not a date and time")
    if when.tzinfo is not None and when.utcoffset() is not None:
        when = when.astimezone(_dt.UTC)
    return when.replace(tzinfo=None, microsecond=0).isoformat(timespec="seconds")


def _kind(kind: BackupKind | str) -> BackupKind:
    try:
        return BackupKind(kind.upper() if isinstance(kind, str) else kind)
    except ValueError:
        raise StatementError(
            f"backup kind {kind!r} is not one of {', '.join(k.value for k in BackupKind)}"
        ) from None


# --- statements -----------------------------------------------------------------------


def backup_statement(
    database: str,
    devices: Sequence[str],
    *,
    kind: BackupKind | str,
    name: str,
    copy_only: bool = False,
    checksum: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
    buffer_count: int = DEFAULT_BUFFER_COUNT,
    max_transfer_size: int = DEFAULT_MAX_TRANSFER_SIZE,
) -> str:
    """``BACKUP DATABASE|LOG [db] TO VIRTUAL_DEVICE = N'..', ... WITH FORMAT[,
    DIFFERENTIAL], NAME = N'name'[, COPY_ONLY][, CHECKSUM], BLOCKSIZE = n, BUFFERCOUNT =
    n, MAXTRANSFERSIZE = n`` (``name``: the backup id, found again in
    ``msdb.dbo.backupset``)."""
    backup_kind = _kind(kind)
    target = _database(database)
    clauses = _devices(devices)
    options = ["FORMAT"]
    if backup_kind is BackupKind.DIFF:
        options.append("DIFFERENTIAL")
    options.append(f"NAME = {quote_string(name)}")
    if copy_only:
        options.append("COPY_ONLY")
    if checksum:
        options.append("CHECKSUM")
    options += _transfer(block_size, buffer_count, max_transfer_size)
    what = "LOG" if backup_kind is BackupKind.LOG else "DATABASE"
    return f"BACKUP {what} {target} TO {clauses} WITH {', '.join(options)}"


def restore_statement(
    database: str,
    devices: Sequence[str],
    *,
    log: bool = False,
    replace: bool = False,
    recovery: bool = True,
    moves: Sequence[tuple[str, str]] = (),
    stopat: _dt.datetime | None = None,
    checksum: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
    buffer_count: int = DEFAULT_BUFFER_COUNT,
    max_transfer_size: int = DEFAULT_MAX_TRANSFER_SIZE,
) -> str:
    """``RESTORE DATABASE|LOG [db] FROM VIRTUAL_DEVICE = N'..', ... WITH [REPLACE, ]
    NORECOVERY|RECOVERY[, MOVE N'logical' TO N'/path' ...][, STOPAT = N'...'][,
    CHECKSUM], BLOCKSIZE = n, BUFFERCOUNT = n, MAXTRANSFERSIZE = n``."""
    target = _database(database)
    clauses = _devices(devices)
    options = ["REPLACE"] if replace else []
    options.append("RECOVERY" if recovery else "NORECOVERY")
    logical_seen: set[str] = set()
    for move in moves:
        if len(move) != 2:
            raise StatementError(f"MOVE {move!r} is not a (logical name, path) pair")
        logical, path = move
        if not logical or not path:
            raise StatementError(f"MOVE {logical!r} TO {path!r}: both must be given")
        if logical in logical_seen:
            raise StatementError(f"MOVE names logical file {logical!r} twice")
        logical_seen.add(logical)
        options.append(f"MOVE {quote_string(logical)} TO {quote_string(path)}")
    if stopat is not None:
        options.append(f"STOPAT = {quote_string(format_stopat(stopat))}")
    if checksum:
        options.append("CHECKSUM")
    options += _transfer(block_size, buffer_count, max_transfer_size)
    what = "LOG" if log else "DATABASE"
    return f"RESTORE {what} {target} FROM {clauses} WITH {', '.join(options)}"


def verifyonly_statement(
    devices: Sequence[str],
    *,
    checksum: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
    buffer_count: int = DEFAULT_BUFFER_COUNT,
    max_transfer_size: int = DEFAULT_MAX_TRANSFER_SIZE,
) -> str:
    """``RESTORE VERIFYONLY FROM VIRTUAL_DEVICE = ... WITH [CHECKSUM, ]BLOCKSIZE = n,
    BUFFERCOUNT = n, MAXTRANSFERSIZE = n``: SQL Server's own check of a backup."""
    clauses = _devices(devices)
    options = ["CHECKSUM"] if checksum else []
    options += _transfer(block_size, buffer_count, max_transfer_size)
    return f"RESTORE VERIFYONLY FROM {clauses} WITH {', '.join(options)}"


def _listing(what: str, devices: Sequence[str], sizes: tuple[int, int, int]) -> str:
    clauses = _devices(devices)
    return f"RESTORE {what} FROM {clauses} WITH {', '.join(_transfer(*sizes))}"


def headeronly_statement(
    devices: Sequence[str],
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    buffer_count: int = DEFAULT_BUFFER_COUNT,
    max_transfer_size: int = DEFAULT_MAX_TRANSFER_SIZE,
) -> str:
    """``RESTORE HEADERONLY FROM VIRTUAL_DEVICE = ... WITH BLOCKSIZE = n, BUFFERCOUNT =
    n, MAXTRANSFERSIZE = n``: the backup's header as rows."""
    return _listing("HEADERONLY", devices, (block_size, buffer_count, max_transfer_size))


def filelistonly_statement(
    devices: Sequence[str],
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    buffer_count: int = DEFAULT_BUFFER_COUNT,
    max_transfer_size: int = DEFAULT_MAX_TRANSFER_SIZE,
) -> str:
    """``RESTORE FILELISTONLY FROM VIRTUAL_DEVICE = ... WITH BLOCKSIZE = n, BUFFERCOUNT
    = n, MAXTRANSFERSIZE = n``: the database's files in the backup, as rows."""
    return _listing("FILELISTONLY", devices, (block_size, buffer_count, max_transfer_size))


# --- queries (rows come back as text, NULL as None) ----------------------------------


def backupset_query(database: str, name: str) -> str:
    """The ``msdb.dbo.backupset`` row of the backup named ``name`` of ``database``:
    type ('D', 'I', 'L'), is_copy_only, first/last/checkpoint/database_backup/
    differential_base LSN, start and finish (the server's local time, ISO 8601),
    database_name, time_zone (the server's offset from UTC then, in 15-minute steps)
    and server_name (``@@SERVERNAME``: the server's identity, whatever the URL calls it)."""
    if not database:
        raise StatementError("the database name is empty")
    return (
        "SET NOCOUNT ON; SELECT TOP (1) type, is_copy_only, first_lsn, last_lsn, "
        "checkpoint_lsn, database_backup_lsn, differential_base_lsn, "
        "CONVERT(varchar(33), backup_start_date, 126), "
        "CONVERT(varchar(33), backup_finish_date, 126), database_name, time_zone, "
        "server_name "
        f"FROM msdb.dbo.backupset WHERE database_name = {quote_string(database)} "
        f"AND name = {quote_string(name)} ORDER BY backup_set_id DESC"
    )


def files_query(database: str) -> str:
    """The database's files: logical name, physical path, type (ROWS, LOG, ...)."""
    if not database:
        raise StatementError("the database name is empty")
    return (
        "SET NOCOUNT ON; SELECT name, physical_name, type_desc FROM sys.master_files "
        f"WHERE database_id = DB_ID({quote_string(database)}) ORDER BY file_id"
    )


def database_query(database: str) -> str:
    """The database's name and state (ONLINE, RESTORING, ...); no row when absent."""
    if not database:
        raise StatementError("the database name is empty")
    return (
        "SET NOCOUNT ON; SELECT name, state_desc FROM sys.databases "
        f"WHERE name = {quote_string(database)}"
    )


def version_query() -> str:
    """The server's product version (``16.0.4135.4``)."""
    return "SET NOCOUNT ON; SELECT CAST(SERVERPROPERTY('ProductVersion') AS nvarchar(128))"
