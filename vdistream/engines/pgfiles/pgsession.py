"""The server's side of a files-mode backup: one libpq connection, kept open throughout.

``BackupConnection.open(url)`` connects (psycopg 3, ``AsyncConnection``, autocommit;
the URL's password is given to libpq as a keyword, never logged; the ``PG*``
environment completes the URL as libpq does), then learns what the backup needs
(``ServerFacts``): the version (15 or later: ``pg_backup_start``/``pg_backup_stop``),
that the role may run a backup (a superuser, or a role with REPLICATION and EXECUTE
on ``pg_backup_start``/``pg_backup_stop``), the data directory, the tablespaces, the
WAL segment size, the system identifier and the catalog version.

``start(label)``: a TEMPORARY physical replication slot that reserves WAL at once
(``pg_create_physical_replication_slot(name, true, true)``), then
``pg_backup_start(label, fast := true)``. Both belong to this session: if vdistream
dies, the server sees the socket close, aborts the non-exclusive backup and drops the
slot, so nothing is left behind; while the backup runs, the slot keeps every WAL
segment from the start on. ``stop()``: ``pg_backup_stop(wait_for_archive := false)``
(the backup label, the tablespace map and the stop position). ``close()`` drops the
slot and closes the connection; after a failure that alone ends the backup (closing
the session aborts it, server side).

Every call is bounded (``timeout``; the backup start's checkpoint gets
``start_timeout``). A PostgreSQL error becomes ``PostgresError`` with the server's
own words.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio

from vdistream.engines.postgres import PostgresError, PostgresURL
from vdistream.log import get_logger

if TYPE_CHECKING:
    import psycopg

__all__ = (
    "MIN_SERVER_VERSION",
    "BackupConnection",
    "BackupStart",
    "BackupStop",
    "ServerFacts",
    "lsn_to_int",
    "wal_segment_names",
)

MIN_SERVER_VERSION = 150000
SLOT_PREFIX = "vdistream_"

_log = get_logger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class ServerFacts:
    """What the backup learns from the server before it starts."""

    server_version: int
    data_directory: str
    tablespaces: Mapping[int, str]  # oid -> location (outside the data directory)
    wal_segment_size: int
    system_identifier: str
    catalog_version: int

    @property
    def version_dir(self) -> str:
        """This server's directory in a tablespace location (``PG_15_202209061``)."""
        return f"PG_{self.server_version // 10000}_{self.catalog_version}"


@dataclasses.dataclass(frozen=True, slots=True)
class BackupStart:
    lsn: str
    timeline: int
    slot: str


@dataclasses.dataclass(frozen=True, slots=True)
class BackupStop:
    lsn: str
    backup_label: bytes
    tablespace_map: bytes


def lsn_to_int(lsn: str) -> int:
    """``"0/3000028"`` as a number."""
    high, _, low = lsn.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def wal_segment_names(start: str, stop: str, timeline: int, segment_size: int) -> list[str]:
    """The WAL segments a backup from ``start`` to ``stop`` needs, in order: the
    segment holding ``start`` up to the one holding the last byte before ``stop``
    (``basebackup.c``'s ``XLByteToSeg`` and ``XLByteToPrevSeg``)."""
    per_id = (1 << 32) // segment_size
    first = lsn_to_int(start) // segment_size
    last = max(first, (lsn_to_int(stop) - 1) // segment_size)
    return [
        f"{timeline:08X}{segno // per_id:08X}{segno % per_id:08X}"
        for segno in range(first, last + 1)
    ]


class BackupConnection:
    """One session with the server for one backup (module docstring)."""

    def __init__(
        self,
        url: PostgresURL,
        connection: psycopg.AsyncConnection[Any],
        *,
        timeout: float,
        start_timeout: float,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.start_timeout = start_timeout
        self._connection = connection
        self._slot: str | None = None
        self._started = False
        self.log = _log.bind(postgres=url.display)

    @classmethod
    async def open(
        cls, url: PostgresURL, *, timeout: float = 60.0, start_timeout: float = 600.0
    ) -> BackupConnection:
        """Connect (bounded by ``timeout``); ``PostgresError`` with libpq's words."""
        # Imported here: only this mode needs it, and every command would pay its import.
        import psycopg
        import psycopg.conninfo

        # the password as a keyword: libpq gets it, no URL or log ever shows it
        conninfo = psycopg.conninfo.make_conninfo(
            url.url,
            application_name="vdistream",
            **({"password": url.password} if url.password is not None else {}),
        )
        try:
            with anyio.fail_after(timeout):
                connection = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
        except TimeoutError:
            raise PostgresError(f"connecting to {url.display} took more than {timeout} s") from None
        except psycopg.Error as exc:
            raise PostgresError(f"cannot connect to {url.display}: {_words(exc)}") from exc
        return cls(url, connection, timeout=timeout, start_timeout=start_timeout)

    async def _rows(
        self, what: str, sql: str, params: Sequence[Any] = (), *, timeout: float | None = None
    ) -> list[tuple[Any, ...]]:
        """Run ``sql``; its rows. ``PostgresError`` naming ``what`` on failure."""
        import psycopg  # imported by ``open`` already: a dict lookup

        bound = self.timeout if timeout is None else timeout
        try:
            with anyio.fail_after(bound):
                cursor = await self._connection.execute(sql, params)
                return await cursor.fetchall() if cursor.description is not None else []
        except TimeoutError:
            raise PostgresError(f"{what} on {self.url.display} took more than {bound} s") from None
        except psycopg.Error as exc:
            raise PostgresError(f"{what} on {self.url.display} failed: {_words(exc)}") from exc

    async def facts(self) -> ServerFacts:
        """What the server is, and whether this role may back it up."""
        ((version,),) = await self._rows(
            "reading the server version", "SELECT current_setting('server_version_num')::int"
        )
        if version < MIN_SERVER_VERSION:
            raise PostgresError(
                f"{self.url.display} runs PostgreSQL {version // 10000}: --mode files needs "
                "PostgreSQL 15 or later (use --mode basebackup)"
            )
        # The session idles while the files are copied: a configured idle or statement
        # timeout must not end it (that would abort the backup); our own bounds apply.
        await self._rows(
            "setting the session's timeouts",
            "SELECT set_config('idle_session_timeout', '0', false),"
            " set_config('statement_timeout', '0', false)",
        )
        ((superuser, replication, may_start, may_stop),) = await self._rows(
            "checking the role's privileges",
            "SELECT r.rolsuper, r.rolreplication,"
            " has_function_privilege('pg_backup_start(text, boolean)', 'EXECUTE'),"
            " has_function_privilege('pg_backup_stop(boolean)', 'EXECUTE')"
            " FROM pg_roles r WHERE r.rolname = current_user",
        )
        if not (superuser or (replication and may_start and may_stop)):
            raise PostgresError(
                f"the role of {self.url.display} may not take a backup: it needs to be a "
                "superuser, or to have REPLICATION and EXECUTE on pg_backup_start and "
                "pg_backup_stop"
            )
        ((data_directory, segment_size),) = await self._rows(
            "reading data_directory (superuser or pg_read_all_settings)",
            "SELECT current_setting('data_directory'),"
            " pg_size_bytes(current_setting('wal_segment_size'))",
        )
        ((system_identifier, catalog_version),) = await self._rows(
            "reading the control file",
            "SELECT system_identifier::text, catalog_version_no FROM pg_control_system()",
        )
        spaces = await self._rows(
            "listing the tablespaces",
            "SELECT oid::bigint, pg_tablespace_location(oid) FROM pg_tablespace"
            " WHERE pg_tablespace_location(oid) <> ''",
        )
        return ServerFacts(
            server_version=int(version),
            data_directory=str(data_directory),
            # an in-place tablespace (a relative location) lives in pg_tblspc itself
            tablespaces={
                int(oid): str(location) for oid, location in spaces if str(location)[:1] == "/"
            },
            wal_segment_size=int(segment_size),
            system_identifier=str(system_identifier),
            catalog_version=int(catalog_version),
        )

    async def start(self, label: str) -> BackupStart:
        """The temporary slot, then ``pg_backup_start`` (module docstring)."""
        slot = SLOT_PREFIX + uuid.uuid4().hex[:16]
        await self._rows(
            "creating a temporary replication slot (REPLICATION or superuser)",
            "SELECT pg_create_physical_replication_slot(%s, true, true)",
            (slot,),
        )
        self._slot = slot
        ((lsn,),) = await self._rows(
            "pg_backup_start",
            "SELECT pg_backup_start(%s, true)::text",
            (label,),
            timeout=self.start_timeout,
        )
        self._started = True
        ((timeline,),) = await self._rows(
            "reading the backup's timeline", "SELECT timeline_id FROM pg_control_checkpoint()"
        )
        self.log.info("pg_backup_started", lsn=lsn, slot=slot, timeline=timeline)
        return BackupStart(str(lsn), int(timeline), slot)

    async def stop(self) -> BackupStop:
        """``pg_backup_stop``: the label, the tablespace map, the stop position."""
        ((lsn, label, spcmap),) = await self._rows(
            "pg_backup_stop",
            "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)",
            timeout=self.start_timeout,
        )
        self._started = False
        self.log.info("pg_backup_stopped", lsn=lsn)
        return BackupStop(str(lsn), str(label).encode(), str(spcmap or "").encode())

    async def drop_slot(self) -> None:
        if self._slot is not None:
            slot, self._slot = self._slot, None
            await self._rows(
                "dropping the replication slot", "SELECT pg_drop_replication_slot(%s)", (slot,)
            )

    async def close(self) -> None:
        """End the session: after a success the slot is dropped first; after a failure
        closing alone aborts the backup and drops the slot (server side). Shielded."""
        with anyio.CancelScope(shield=True):
            try:
                if not self._started and self._slot is not None:
                    try:
                        await self.drop_slot()
                    except PostgresError as exc:  # the session's end drops it anyway
                        self.log.warning("pg_slot_drop_failed", error=str(exc))
            finally:
                await self._connection.close()


def _words(exc: Exception) -> str:
    """The server's (or libpq's) message, on one line."""
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    text = primary or str(exc) or type(exc).__name__
    return " ".join(text.split())
