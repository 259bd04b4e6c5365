"""SQL Server's side of restore and verify: engines for a manifest, the target's checks.

A SQL Server backup is restored by a ``RESTORE DATABASE|LOG`` that reads the stored
streams back through ``libsqlvdi.so``'s devices, and verified by ``RESTORE VERIFYONLY``
the same way. Decisions:

* The target is a database URL (``mssql://user@host:port/newdb``). A database that
  exists is refused before anything is read unless ``replace`` is given, with a line
  that says so; SQL Server would refuse it too (3154), later and less clearly.
* Restoring under another name moves the files: without ``moves``, each of the
  backup's files (recorded in the manifest from ``sys.master_files``) goes to the
  directory it was in, renamed after the new database (``newdb.mdf``,
  ``newdb_log.ldf``, ``newdb_<logical>.ndf``), so the source database's files are
  never touched. ``moves`` given by the user replace that entirely.
* A failed restore leaves no target: a database that did not exist before is dropped
  again (``DROP DATABASE``) when its restore, or any step of its chain, fails. One that
  existed (``replace``) is SQL Server's to leave RESTORING, as it does; we say so.
"""

from __future__ import annotations

import dataclasses
import datetime
import posixpath

from vdistream.catalog import Manifest
from vdistream.coordinator import JobOptions
from vdistream.errors import ConfigError
from vdistream.log import get_logger
from vdistream.sqlserver.engine import (
    SqlServerRestore,
    SqlServerStatementError,
    SqlServerVerify,
    Transfer,
)
from vdistream.sqlserver.trigger import SqlServerError, trigger_for
from vdistream.sqlserver.tsql import database_query, quote_name
from vdistream.sqlserver.url import MssqlURL

__all__ = (
    "SqlRestoreOptions",
    "database_exists",
    "drop_database",
    "restore_job_options",
    "sqlserver_restore_engine",
    "sqlserver_verify_engine",
    "target_moves",
)

_log = get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class SqlRestoreOptions:
    """How a SQL Server restore runs: ``REPLACE``, ``RECOVERY`` (False:
    ``NORECOVERY``, more backups follow), ``MOVE`` pairs (logical name, path),
    ``STOPAT`` (aware), and the ``libsqlvdi.so`` to use."""

    replace: bool = False
    recovery: bool = True
    moves: tuple[tuple[str, str], ...] = ()
    stopat: datetime.datetime | None = None
    sqlvdi: str | None = None


def _transfer(manifest: Manifest) -> Transfer:
    vdi = manifest.vdi
    return Transfer(vdi["block_size"], vdi["max_transfer_size"], vdi.get("buffer_count"))


def restore_job_options(manifest: Manifest) -> JobOptions:
    """A restore's job: SQL Server lays down (zeroes) the files before its first READ,
    which on a large database takes minutes; the watchdogs wait that long."""
    return JobOptions(
        devices=len(manifest.devices), configuration_timeout=120.0, stall_timeout=900.0
    )


def target_moves(manifest: Manifest, database: str) -> tuple[tuple[str, str], ...]:
    """The files of the backup, moved beside themselves under ``database``'s name
    (module docstring); none when the name is the backup's own."""
    info = manifest.sqlserver or {}
    if database == info.get("database"):
        return ()
    moves: list[tuple[str, str]] = []
    for file in info.get("files") or []:
        logical, physical, kind = file["logical"], file["physical"], file.get("type")
        folder = posixpath.dirname(physical.replace("\\", "/"))
        if kind == "LOG":
            name = f"{database}_log.ldf"
        elif not moves:  # the primary data file comes first (file_id order)
            name = f"{database}.mdf"
        else:
            name = f"{database}_{logical}.ndf"
        moves.append((logical, posixpath.join(folder, name) if folder else name))
    return tuple(moves)


def sqlserver_restore_engine(
    manifest: Manifest, target: str, options: SqlRestoreOptions
) -> SqlServerRestore:
    if manifest.sqlserver is None:
        raise ConfigError(f"backup {manifest.backup_id} has no SQL Server record")
    url = MssqlURL.parse(target)
    kind = manifest.sqlserver.get("type")
    # files are laid down by the full restore only; later steps apply to them
    moves = options.moves or target_moves(manifest, url.database) if kind == "D" else ()
    return SqlServerRestore(
        url,
        len(manifest.devices),
        _transfer(manifest),
        log=kind == "L",
        replace=options.replace,
        recovery=options.recovery,
        moves=moves,
        stopat=options.stopat,
        library=options.sqlvdi,
    )


def sqlserver_verify_engine(
    manifest: Manifest, server: str, *, sqlvdi: str | None = None
) -> SqlServerVerify:
    return SqlServerVerify(
        MssqlURL.parse(server), len(manifest.devices), _transfer(manifest), library=sqlvdi
    )


async def database_exists(url: MssqlURL) -> bool:
    """Whether ``url.database`` exists on its server (``sys.databases``)."""
    try:
        rows = (await trigger_for(url).run(database_query(url.database), query=True)).rows
    except SqlServerError as exc:
        raise SqlServerStatementError(
            f"SQL Server at {url.host},{url.port}: {url.redact(str(exc))}", numbers=exc.numbers
        ) from exc
    return bool(rows)


async def drop_database(url: MssqlURL) -> str | None:
    """Drop what a failed restore left of ``url.database``; the failure's text, if any."""
    statement = f"DROP DATABASE {quote_name(url.database)}"
    try:
        if not await database_exists(url):  # refused before it made anything
            return None
        await trigger_for(url).run(statement)
    except SqlServerStatementError as exc:
        _log.error("restore_cleanup_failed", database=url.database, error=str(exc))
        return str(exc)
    except SqlServerError as exc:
        _log.error("restore_cleanup_failed", database=url.database, error=url.redact(str(exc)))
        return url.redact(str(exc))
    _log.info("restore_target_dropped", database=url.database)
    return None
