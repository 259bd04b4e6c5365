"""SQL Server's side of restore and verify: engines for a manifest, the target's checks.

A SQL Server backup is restored by a ``RESTORE DATABASE|LOG`` that reads the stored
streams back through ``libsqlvdi.so``'s devices, and verified by ``RESTORE VERIFYONLY``
the same way. Decisions:

* The target is a database URL (``mssql://user@host:port/newdb``). A full backup
  into a database that exists is refused before anything is read unless ``replace``
  is given, with a line that says so; SQL Server would refuse it too (3154), later and
  less clearly. A differential or log backup applies only to a database left
  RESTORING (``--norecovery``), and is refused at once otherwise.
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

import anyio

from vdistream.catalog import Manifest
from vdistream.coordinator import JobOptions
from vdistream.engines.scoped import TargetExistsError
from vdistream.errors import ConfigError
from vdistream.log import get_logger
from vdistream.sqlserver.engine import (
    SqlServerRestore,
    SqlServerStatementError,
    SqlServerVerify,
    Transfer,
    run_statement,
)
from vdistream.sqlserver.tsql import database_query, quote_name
from vdistream.sqlserver.url import MssqlURL

__all__ = (
    "SqlRestoreOptions",
    "check_target",
    "database_exists",
    "database_state",
    "drop_after_failure",
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
    logs = 0
    for file in info.get("files") or []:
        logical, physical, kind = file["logical"], file["physical"], file.get("type")
        folder = posixpath.dirname(physical.replace("\\", "/"))
        if kind == "LOG":
            # the first log file takes the usual name; more get their logical names
            name = f"{database}_log.ldf" if not logs else f"{database}_{logical}.ldf"
            logs += 1
        elif not moves:  # the primary data file comes first (file_id order)
            name = f"{database}.mdf"
        elif kind == "ROWS":
            name = f"{database}_{logical}.ndf"
        else:  # FILESTREAM, full-text: a directory of its own
            name = f"{database}_{logical}"
        moves.append((logical, posixpath.join(folder, name) if folder else name))
    return tuple(moves)


def sqlserver_restore_engine(
    manifest: Manifest, target: str, options: SqlRestoreOptions
) -> SqlServerRestore:
    if manifest.sqlserver is None:
        raise ConfigError(f"backup {manifest.backup_id} has no SQL Server record")
    url = MssqlURL.parse(target)
    kind = manifest.sqlserver.get("type")
    if options.moves and kind != "D":
        raise ConfigError(
            f"--move applies to the restore of a full backup; {manifest.backup_id} is a "
            f"{'log' if kind == 'L' else 'differential'} backup, restored onto the files "
            "its full backup laid down"
        )
    # files are laid down by the full restore only; later steps apply to them
    moves = options.moves or target_moves(manifest, url.database) if kind == "D" else ()
    return SqlServerRestore(
        url,
        len(manifest.devices),
        _transfer(manifest),
        log=kind == "L",
        replace=options.replace and kind == "D",
        time_zone_minutes=int(manifest.sqlserver.get("time_zone_minutes") or 0),
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


async def database_state(url: MssqlURL) -> str | None:
    """``url.database``'s state (``ONLINE``, ``RESTORING``, ...; ``sys.databases``),
    ``None`` when it does not exist."""
    rows = (await run_statement(url, database_query(url.database), query=True)).rows
    return (rows[0][1] or "UNKNOWN") if rows and len(rows[0]) > 1 else None


async def database_exists(url: MssqlURL) -> bool:
    """Whether ``url.database`` exists on its server."""
    return await database_state(url) is not None


def check_target(manifest: Manifest, url: MssqlURL, state: str | None, replace: bool) -> None:
    """Refuse a restore its target's state does not allow (module docstring)."""
    kind = (manifest.sqlserver or {}).get("type")
    where = f"{url.host},{url.port}"
    if kind == "D":
        if state is not None and not replace:
            raise TargetExistsError(
                f"database {url.database!r} already exists on {where}: give --replace to "
                "restore over it (its current content is lost)"
            )
        return
    what = "log" if kind == "L" else "differential"
    if state is None:
        raise TargetExistsError(
            f"database {url.database!r} does not exist on {where}: a {what} backup applies "
            "to a database restored from its full backup with --norecovery; restore that "
            "first, or use --to to restore the whole chain"
        )
    if state != "RESTORING":
        raise TargetExistsError(
            f"database {url.database!r} on {where} is {state}, not RESTORING: a {what} "
            "backup applies only to a database left restoring (--norecovery)"
        )


#: how long the cleanup of a failed restore may take (it runs shielded)
DROP_WITHIN = 30.0


async def drop_after_failure(url: MssqlURL) -> str | None:
    """After a restore (or chain) that failed or was interrupted: drop the database it
    made, shielded from the cancellation that may have caused it and bounded by
    ``DROP_WITHIN``; what was left, in words, or ``None``."""
    left: str | None = "the database could not be dropped in time"
    with anyio.CancelScope(shield=True), anyio.move_on_after(DROP_WITHIN):
        left = await drop_database(url)
    return left


async def drop_database(url: MssqlURL) -> str | None:
    """Drop what a failed restore left of ``url.database``; the failure's text, if any."""
    statement = f"DROP DATABASE {quote_name(url.database)}"
    try:
        if not await database_exists(url):  # refused before it made anything
            return None
        await run_statement(url, statement)
    except SqlServerStatementError as exc:
        _log.error("restore_cleanup_failed", database=url.database, error=str(exc))
        return str(exc)
    _log.info("restore_target_dropped", database=url.database)
    return None
