"""A SQL Server database as a backup source: ``mssql://user@host:port/database``.

It offers what ``operations`` asks of any source (``kind``, ``mode``, ``display``,
``describe()``, ``file_mode()``) and builds the job's engine. ``mode`` is the backup's
kind: ``full`` (the default), ``diff``, ``log`` or ``copy-only`` (a full backup that
leaves the differential base and the log chain alone).
"""

from __future__ import annotations

import dataclasses

from vdistream.errors import ConfigError
from vdistream.log import get_logger
from vdistream.sqlserver import permissions
from vdistream.sqlserver.engine import BACKUP_MODES, SqlServerBackup, Transfer, run_statement
from vdistream.sqlserver.library import library_path, load
from vdistream.sqlserver.tsql import version_query
from vdistream.sqlserver.url import MssqlURL

__all__ = ("SqlServerSource",)

_log = get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class SqlServerSource:
    """What to back up; its fields may be shown and stored (no password in them)."""

    kind: str
    mode: str
    display: str
    url: MssqlURL = dataclasses.field(repr=False, compare=False)
    library: str | None = dataclasses.field(default=None, repr=False, compare=False)

    @classmethod
    def resolve(
        cls, url: str, *, mode: str | None = None, library: str | None = None
    ) -> SqlServerSource:
        parsed = MssqlURL.parse(url)
        chosen = mode or "full"
        if chosen not in BACKUP_MODES:
            raise ConfigError(
                f"mode {chosen!r} for {parsed.display!r}: a SQL Server backup is "
                f"{', '.join(BACKUP_MODES)}"
            )
        return cls("mssql", chosen, parsed.display, parsed, library)

    def backup_engine(
        self, devices: int, transfer: Transfer, *, backup_id: str, checksum: bool = True
    ) -> SqlServerBackup:
        return SqlServerBackup(
            self.url,
            devices,
            transfer,
            mode=self.mode,
            backup_id=backup_id,
            checksum=checksum,
            library=self.library,
        )

    def preflight(self) -> None:
        """Before anything else: the library must load (``SqlVdiLibraryError`` naming the
        path and what is missing), and what would keep SQL Server from opening the set's
        shared memory (user and groups, the umask) is logged as a warning; when it does
        fail, the job's error says what to fix."""
        path = library_path(self.library)
        load(path)
        for problem in permissions.check(path):
            _log.warning("sqlserver_permissions", problem=problem)

    async def file_mode(self) -> int | None:
        return None

    async def describe(self) -> dict[str, str]:
        """SQL Server's version; a wrong password or an unreachable server fails here,
        before any set is created."""
        rows = (await run_statement(self.url, version_query(), query=True)).rows
        version = rows[0][0] if rows and rows[0] and rows[0][0] else "unknown"
        return {"kind": "mssql", "source": self.display, "sqlserver": version}
