"""Job state that survives a restart: a small SQLite database in the state directory.

``store = await JobStore.open(state_dir / "state.db")`` (or ``async with``), then
``add``, ``update``, ``get``, ``list``, ``mark_interrupted``, the last-verified-backup
records, the newest successful backups (``last_successes``), and ``await store.close()``.

Contracts
---------

* **One connection, serialized.** Every call runs in a worker thread
  (``anyio.to_thread.run_sync``) through the store's own ``CapacityLimiter(1)``, so
  calls from many tasks run one at a time and each is one SQLite transaction
  (``BEGIN IMMEDIATE`` for writes): an ``update`` reads, checks and writes atomically,
  no update is lost. A call that was started is not abandoned when its task is
  cancelled: it finishes, then the cancellation is delivered.
* **Durable.** WAL journal, ``synchronous=FULL``: a call that returned survives a
  crash or power loss. ``busy_timeout`` 5 s if another process holds the lock.
* **Schema versioned** with ``PRAGMA user_version`` (``SCHEMA_VERSION``) and marked
  with ``PRAGMA application_id`` (``APPLICATION_ID``). A new file gets the current
  schema; a file with a newer version, another application's id, tables but no
  version, or that is not SQLite at all raises ``StateError`` naming the path and
  what to do; nothing in it is changed.
* **Jobs** move ``queued -> running -> succeeded | failed | aborted`` (``queued`` may
  also go straight to ``failed`` or ``aborted``); a terminal state is final:
  changing it raises ``StateError``, while other fields (result, error, keys) may
  still be written. Entering ``running`` sets ``started`` and entering a terminal
  state sets ``ended`` (the store's clock) unless the call gives them.
* **Ends observed.** ``observe_ends(callback)``: ``callback(record)`` is called for
  every job a call of this store moved into a terminal state (``update``,
  ``mark_interrupted``), with the record as stored, in the caller's thread right after
  the write (the service's per-database metrics: one place sees every end, whoever
  wrote it). It must not block; its exceptions are logged (``job_end_observer_failed``)
  and never fail the write.
* **Restart.** ``mark_interrupted()`` (call it once at start, before accepting jobs)
  marks every ``queued`` or ``running`` job ``failed`` with ``INTERRUPTED_REASON``
  ("the daemon stopped while the job was running"; ``INTERRUPTED_QUEUED_REASON`` for
  jobs that had not started) and returns them, so the caller can remove the partial
  storage named by their ``storage_url``/``storage_keys``. Record those keys with
  ``update(..., add_storage_keys=...)`` *before* writing them.
* **Times** are aware datetimes, stored as UTC ISO-8601 text; naive datetimes are a
  ``ValueError``. JSON fields (``progress``, ``result``, ``params``) hold JSON values
  (``TypeError`` otherwise); each read returns fresh copies.
* **Job ids** (``new_job_id``) are ``20240131T235959.123Z-1a2b3c4d5e``: UTC time to
  the millisecond, then 40 random bits. Fixed width, so they sort by creation time;
  within one process they are strictly increasing (a second id in the same
  millisecond takes the next millisecond).
* ``storage_url`` is stored as given: pass URLs without credentials.
* One daemon per state database: ``serve`` should hold a lock file; two processes
  would each mark the other's jobs interrupted.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Self, TypedDict, TypeVar, Unpack

import anyio
import anyio.to_thread

from vdistream.errors import VdistreamError
from vdistream.log import get_logger

__all__ = (
    "APPLICATION_ID",
    "INTERRUPTED_QUEUED_REASON",
    "INTERRUPTED_REASON",
    "SCHEMA_VERSION",
    "WRITE_TIMEOUT",
    "JobChanges",
    "JobNotFoundError",
    "JobRecord",
    "JobState",
    "JobStore",
    "JobType",
    "StateError",
    "VerifiedBackup",
    "new_job_id",
)

SCHEMA_VERSION = 1
#: "VDST": marks the file as vdistream's (``PRAGMA application_id``).
APPLICATION_ID = 0x56445354
INTERRUPTED_REASON = "the daemon stopped while the job was running"
INTERRUPTED_QUEUED_REASON = "the daemon stopped while the job was queued"
#: How long the daemon waits for one write of a job's progress or end (seconds).
WRITE_TIMEOUT = 30.0

_T = TypeVar("_T")

log = get_logger(__name__)


class StateError(VdistreamError):
    """The state database cannot be used, or a change is not allowed."""


class JobNotFoundError(StateError, LookupError):
    """No job has this id."""


class JobType(StrEnum):
    BACKUP = "backup"
    RESTORE = "restore"
    VERIFY = "verify"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ABORTED = "aborted"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.ABORTED})
_TRANSITIONS: Mapping[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.FAILED, JobState.ABORTED}),
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.ABORTED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.ABORTED: frozenset(),
}


def _utc_now() -> datetime:
    return datetime.now(UTC)


_id_lock = threading.Lock()
_last_id_ms = 0


def new_job_id(now: datetime | None = None) -> str:
    """A sortable job id: ``YYYYMMDDTHHMMSS.mmmZ-`` + 10 hex digits (see module doc)."""
    global _last_id_ms
    when = (now or _utc_now()).astimezone(UTC)
    ms = int(when.timestamp() * 1000)
    with _id_lock:
        if now is None:
            ms = max(ms, _last_id_ms + 1)
            _last_id_ms = ms
    stamp = datetime.fromtimestamp(ms / 1000, UTC)
    return f"{stamp:%Y%m%dT%H%M%S}.{ms % 1000:03d}Z-{secrets.token_hex(5)}"


@dataclass(frozen=True)
class JobRecord:
    """One job as stored. ``JobRecord.new(kind, database, ...)`` fills id and time.

    ``progress`` is the per-device progress (a JSON object, e.g. ``{"devices": [...]}``),
    ``result`` the final result, ``params`` the request (restore target, ...);
    ``storage_url`` and ``storage_keys`` say where the job writes, for cleanup.
    """

    id: str
    kind: JobType
    database: str
    state: JobState = JobState.QUEUED
    created: datetime = field(default_factory=_utc_now)
    started: datetime | None = None
    ended: datetime | None = None
    progress: Mapping[str, Any] = field(default_factory=dict)
    result: Mapping[str, Any] | None = None
    error: str | None = None
    storage_url: str | None = None
    storage_keys: tuple[str, ...] = ()
    backup_id: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def new(cls, kind: JobType | str, database: str, **fields: Any) -> JobRecord:
        """A queued job with a fresh id and ``created`` = now (UTC)."""
        created = fields.pop("created", None) or _utc_now()
        return cls(
            id=fields.pop("id", None) or new_job_id(),
            kind=JobType(kind),
            database=database,
            created=created,
            **fields,
        )


@dataclass(frozen=True)
class VerifiedBackup:
    """The newest backup of a database that a verification succeeded for."""

    database: str
    backup_id: str
    backup_ended: datetime
    verified_at: datetime
    job_id: str | None = None


class JobChanges(TypedDict, total=False):
    """The fields ``JobStore.update`` may change; a field not given is left as it is."""

    started: datetime | None
    ended: datetime | None
    progress: Mapping[str, Any]
    result: Mapping[str, Any] | None
    error: str | None
    storage_url: str | None
    storage_keys: Sequence[str]
    add_storage_keys: Iterable[str]
    backup_id: str | None


_SCHEMA = """
CREATE TABLE jobs (
    id           TEXT PRIMARY KEY,
    kind         TEXT NOT NULL CHECK (kind IN ('backup', 'restore', 'verify')),
    database     TEXT NOT NULL,
    state        TEXT NOT NULL
                 CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'aborted')),
    created      TEXT NOT NULL,
    started      TEXT,
    ended        TEXT,
    progress     TEXT NOT NULL DEFAULT '{}',
    result       TEXT,
    error        TEXT,
    storage_url  TEXT,
    storage_keys TEXT NOT NULL DEFAULT '[]',
    backup_id    TEXT,
    params       TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX jobs_by_state ON jobs (state);
CREATE INDEX jobs_by_created ON jobs (created);
CREATE INDEX IF NOT EXISTS jobs_by_backup ON jobs (backup_id);
CREATE TABLE last_verified (
    database     TEXT PRIMARY KEY,
    backup_id    TEXT NOT NULL,
    backup_ended TEXT NOT NULL,
    verified_at  TEXT NOT NULL,
    job_id       TEXT
);
"""

_COLUMNS = tuple(f.name for f in dataclasses.fields(JobRecord))
#: A backup job's mode as SQL: the request's ``mode`` (SQL Server), else ``full``.
_MODE = "coalesce(json_extract(params, '$.mode'), 'full')"


def _time(value: datetime) -> str:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"naive datetime {value!r}: the job store needs aware datetimes")
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def _opt_time(value: datetime | None) -> str | None:
    return None if value is None else _time(value)


def _parse_time(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, allow_nan=False, separators=(",", ":"))


def _json_or_none(value: Any) -> str | None:
    return None if value is None else _json(dict(value))


def _same(value: Any) -> Any:
    return value


#: How each ``JobRecord`` field is written to its column (``_same`` if not listed).
_ENCODE: Mapping[str, Callable[[Any], Any]] = {
    "kind": lambda kind: JobType(kind).value,
    "state": lambda state: JobState(state).value,
    "created": _time,
    "started": _opt_time,
    "ended": _opt_time,
    "progress": lambda progress: _json(dict(progress)),
    "result": _json_or_none,
    "storage_keys": lambda keys: _json(list(keys)),
    "params": lambda params: _json(dict(params)),
}
#: How each column is read back into its ``JobRecord`` field.
_DECODE: Mapping[str, Callable[[Any], Any]] = {
    "kind": JobType,
    "state": JobState,
    "created": _parse_time,
    "started": _parse_time,
    "ended": _parse_time,
    "progress": json.loads,
    "result": lambda text: None if text is None else json.loads(text),
    "storage_keys": lambda text: tuple(json.loads(text)),
    "params": json.loads,
}


def _row_values(job: JobRecord) -> tuple[Any, ...]:
    return tuple(_ENCODE.get(name, _same)(getattr(job, name)) for name in _COLUMNS)


def _record(row: sqlite3.Row) -> JobRecord:
    return JobRecord(**{name: _DECODE.get(name, _same)(row[name]) for name in _COLUMNS})


def _verified(row: sqlite3.Row) -> VerifiedBackup:
    ended = _parse_time(row["backup_ended"])
    at = _parse_time(row["verified_at"])
    assert ended is not None
    assert at is not None
    return VerifiedBackup(row["database"], row["backup_id"], ended, at, row["job_id"])


class JobStore:
    """The job and last-verified tables of one SQLite file (contract: module doc)."""

    def __init__(
        self, path: Path, connection: sqlite3.Connection, clock: Callable[[], datetime]
    ) -> None:
        # use JobStore.open()
        self.path = path
        self._db: sqlite3.Connection | None = connection
        self._clock = clock
        self._lock = threading.Lock()
        self._limiter = anyio.CapacityLimiter(1)
        self._ended: Callable[[JobRecord], None] | None = None

    # --- lifecycle ------------------------------------------------------------------

    @classmethod
    async def open(cls, path: str | Path, *, clock: Callable[[], datetime] = _utc_now) -> JobStore:
        """Open (creating if needed, with its directory, mode 0700) the state database."""
        target = Path(path)
        connection = await anyio.to_thread.run_sync(_connect, target)
        return cls(target, connection, clock)

    async def close(self) -> None:
        """Close the connection (after the call in progress, if any). Idempotent;
        shielded, so that a cancelled owner still closes it."""
        with anyio.CancelScope(shield=True):
            await self._call(self._close, closing=True)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _call(self, fn: Callable[..., _T], *args: Any, closing: bool = False) -> _T:
        def locked() -> _T:
            with self._lock:
                if self._db is None and not closing:
                    raise StateError(f"the job store {self.path} is closed")
                return fn(*args)

        return await anyio.to_thread.run_sync(locked, limiter=self._limiter)

    async def _select(
        self, convert: Callable[[sqlite3.Row], _T], sql: str, *args: Any
    ) -> builtins.list[_T]:
        """``convert`` (in the worker thread) of every row that ``sql`` selects."""
        return await self._call(lambda: [convert(r) for r in self._conn().execute(sql, args)])

    async def _change(self, sql: str, *args: Any) -> int:
        """One writing statement, in a transaction of its own; how many rows it changed."""

        def run() -> int:
            with self._conn() as db:
                return db.execute(sql, args).rowcount

        return await self._call(run)

    def _conn(self) -> sqlite3.Connection:
        assert self._db is not None
        return self._db

    def _now(self) -> datetime:
        now = self._clock()
        _time(now)  # refuses naive
        return now

    def observe_ends(self, callback: Callable[[JobRecord], None] | None) -> None:
        """Tell ``callback`` of every job this store ends from now on (module doc:
        Ends observed); ``None`` stops it."""
        self._ended = callback

    def _tell_ended(self, records: Iterable[JobRecord]) -> None:
        callback = self._ended
        if callback is None:
            return
        for record in records:
            try:
                callback(record)
            except Exception:  # an observer never fails a write
                log.exception("job_end_observer_failed", job_id=record.id)

    # --- jobs -----------------------------------------------------------------------

    async def add(self, job: JobRecord) -> JobRecord:
        """Insert a new job; ``StateError`` if its id exists. Returns it as stored."""
        return await self._call(self._add, job)

    def _add(self, job: JobRecord) -> JobRecord:
        values = _row_values(job)
        db = self._conn()
        try:
            with db:
                db.execute(
                    f"INSERT INTO jobs ({', '.join(_COLUMNS)}) "
                    f"VALUES ({', '.join('?' for _ in _COLUMNS)})",
                    values,
                )
        except sqlite3.IntegrityError as exc:
            raise StateError(f"job {job.id} already exists") from exc
        return self._get(job.id)

    async def get(self, job_id: str) -> JobRecord:
        """The job with this id; ``JobNotFoundError`` if there is none."""
        return await self._call(self._get, job_id)

    def _get(self, job_id: str) -> JobRecord:
        row = self._conn().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFoundError(f"no job {job_id!r}")
        return _record(row)

    async def update(
        self, job_id: str, *, state: JobState | str | None = None, **fields: Unpack[JobChanges]
    ) -> JobRecord:
        """Change the given fields atomically and return the job as stored.

        ``state`` must be a legal transition (module doc), else ``StateError``;
        ``storage_keys`` replaces the list, ``add_storage_keys`` appends the keys not
        yet in it (safe from concurrent tasks). ``JobNotFoundError`` if no such job.
        """
        given: dict[str, Any] = dict(fields)
        unknown = given.keys() - JobChanges.__annotations__.keys()
        if unknown:
            raise TypeError(f"update() got unknown fields {sorted(unknown)}")
        keys = given.pop("storage_keys", None)
        replace_keys = None if keys is None else list(keys)
        add_keys = list(given.pop("add_storage_keys", ()))
        changes = {name: _ENCODE.get(name, _same)(value) for name, value in given.items()}
        new_state = None if state is None else JobState(state)
        record, ended = await self._call(
            self._update, job_id, new_state, changes, replace_keys, add_keys
        )
        if ended:
            self._tell_ended((record,))
        return record

    def _update(
        self,
        job_id: str,
        state: JobState | None,
        changes: dict[str, Any],
        replace_keys: builtins.list[str] | None,
        add_keys: builtins.list[str],
    ) -> tuple[JobRecord, bool]:
        """The job as stored now, and whether this call ended it."""
        db = self._conn()
        ended = False
        with db:
            db.execute("BEGIN IMMEDIATE")
            current = self._get(job_id)
            if state is not None and state is not current.state:
                if state not in _TRANSITIONS[current.state]:
                    raise StateError(
                        f"job {job_id} cannot go from {current.state} to {state}"
                        + (" (its state is final)" if current.state.terminal else "")
                    )
                changes["state"] = state.value
                now = _time(self._now())
                if state is JobState.RUNNING and "started" not in changes:
                    changes["started"] = _opt_time(current.started) or now
                if state.terminal and "ended" not in changes:
                    changes["ended"] = now
                ended = state.terminal
            if replace_keys is not None or add_keys:
                keys = list(current.storage_keys) if replace_keys is None else replace_keys
                keys += [k for k in dict.fromkeys(add_keys) if k not in keys]
                changes["storage_keys"] = _json(keys)
            if changes:
                assignments = ", ".join(f"{column} = ?" for column in changes)
                db.execute(
                    f"UPDATE jobs SET {assignments} WHERE id = ?", (*changes.values(), job_id)
                )
            return self._get(job_id), ended

    async def list(
        self,
        limit: int | None = 100,
        *,
        state: JobState | str | Iterable[JobState | str] | None = None,
        database: str | None = None,
        kind: JobType | str | None = None,
    ) -> builtins.list[JobRecord]:
        """Jobs newest first (by ``created``, then id), filtered by state (one or several),
        database and kind; at most ``limit`` (``None``: all)."""
        where: builtins.list[str] = []
        args: builtins.list[Any] = []
        if state is not None:
            states = [state] if isinstance(state, str) else builtins.list(state)
            values = [JobState(s).value for s in states]
            where.append(f"state IN ({', '.join('?' for _ in values)})")
            args += values
        if database is not None:
            where.append("database = ?")
            args.append(database)
        if kind is not None:
            where.append("kind = ?")
            args.append(JobType(kind).value)
        sql = "SELECT * FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created DESC, id DESC"
        if limit is not None:
            if limit < 0:
                raise ValueError("limit must be >= 0 or None")
            sql += " LIMIT ?"
            args.append(limit)
        return await self._select(_record, sql, *args)

    async def mark_interrupted(self) -> builtins.list[JobRecord]:
        """Mark every queued or running job failed (module doc) and return them, oldest
        first, as stored now."""
        records = await self._call(self._mark_interrupted)
        self._tell_ended(records)
        return records

    def _mark_interrupted(self) -> builtins.list[JobRecord]:
        db = self._conn()
        with db:
            db.execute("BEGIN IMMEDIATE")
            rows = db.execute(
                "SELECT id, state FROM jobs WHERE state IN ('queued', 'running') "
                "ORDER BY created, id"
            ).fetchall()
            now = _time(self._now())
            for row in rows:
                reason = (
                    INTERRUPTED_REASON if row["state"] == "running" else INTERRUPTED_QUEUED_REASON
                )
                db.execute(
                    "UPDATE jobs SET state = 'failed', error = ?, ended = ? WHERE id = ?",
                    (reason, now, row["id"]),
                )
            return [self._get(row["id"]) for row in rows]

    async def verify_outcomes(self, database: str, backup_ids: Iterable[str]) -> dict[str, bool]:
        """For each of ``backup_ids`` that has a finished verification of ``database``:
        whether its latest one succeeded. Reads only those backups' rows (an index on
        ``backup_id``), never the whole history, however long the history grows."""
        wanted = sorted(set(backup_ids))
        outcomes: dict[str, bool] = {}
        for start in range(0, len(wanted), 500):  # well under SQLite's variable limit
            chunk = wanted[start : start + 500]
            rows = await self._select(
                lambda row: (row["backup_id"], row["state"] == "succeeded"),
                "SELECT backup_id, state FROM jobs WHERE kind = 'verify' AND database = ? "
                "AND state IN ('succeeded', 'failed') "
                f"AND backup_id IN ({', '.join('?' * len(chunk))}) ORDER BY created DESC, id DESC",
                database,
                *chunk,
            )
            for backup_id, ok in rows:  # newest first: the first outcome is the latest
                outcomes.setdefault(backup_id, ok)
        return outcomes

    async def delete_finished(self, before: datetime) -> int:
        """Forget terminal jobs that ended before ``before``; returns how many.

        The latest finished verification of each backup is kept whatever its age:
        retention asks it whether a backup was verified (``verify_outcomes``), and a
        verified backup forgotten as unverified could be deleted too early. So is the
        newest successful backup of each database and mode (``last_successes``): the
        metric that alerts on a missing backup must not see "never" because the
        history is short."""
        return await self._change(
            "DELETE FROM jobs WHERE state IN ('succeeded', 'failed', 'aborted') "
            "AND ended IS NOT NULL AND ended < ? AND id NOT IN ("
            "  SELECT id FROM ("
            "    SELECT id, row_number() OVER ("
            "      PARTITION BY database, backup_id ORDER BY created DESC, id DESC"
            "    ) AS n FROM jobs WHERE kind = 'verify' AND backup_id IS NOT NULL"
            "    AND state IN ('succeeded', 'failed')"
            "  ) WHERE n = 1"
            ") AND id NOT IN ("
            "  SELECT id FROM ("
            "    SELECT id, row_number() OVER ("
            f"      PARTITION BY database, {_MODE} ORDER BY ended DESC, id DESC"
            "    ) AS n FROM jobs WHERE kind = 'backup' AND state = 'succeeded'"
            "  ) WHERE n = 1"
            ")",
            _time(before),
        )

    async def last_successes(self) -> dict[tuple[str, str], datetime]:
        """The end time of the newest successful backup of each database, by mode:
        ``{(database, mode): ended}``. The mode is the request's (SQL Server: ``full``,
        ``diff``, ``log``, ``copy-only``), ``full`` for the other engines' backups."""
        rows = await self._select(
            lambda row: (row["database"], row["mode"], row["ended"]),
            f"SELECT database, {_MODE} AS mode, max(ended) AS ended FROM jobs "
            "WHERE kind = 'backup' AND state = 'succeeded' AND ended IS NOT NULL "
            "GROUP BY database, mode",
        )
        return {(db, mode): datetime.fromisoformat(ended) for db, mode, ended in rows}

    # --- last verified backup per database --------------------------------------------

    async def record_verified(
        self,
        database: str,
        backup_id: str,
        *,
        backup_ended: datetime,
        verified_at: datetime | None = None,
        job_id: str | None = None,
    ) -> VerifiedBackup:
        """Record that ``backup_id`` of ``database`` verified. The record keeps the
        backup that ended last: verifying an older backup does not replace a newer one
        (equal ``backup_ended``: the new record wins). Returns the record now stored."""
        ended = _time(backup_ended)
        at_value = verified_at

        def run() -> VerifiedBackup:
            at = _time(at_value if at_value is not None else self._now())
            db = self._conn()
            with db:
                db.execute("BEGIN IMMEDIATE")
                db.execute(
                    "INSERT INTO last_verified (database, backup_id, backup_ended, "
                    "verified_at, job_id) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (database) DO UPDATE SET backup_id = excluded.backup_id, "
                    "backup_ended = excluded.backup_ended, verified_at = excluded.verified_at, "
                    "job_id = excluded.job_id "
                    "WHERE excluded.backup_ended >= last_verified.backup_ended",
                    (database, backup_id, ended, at, job_id),
                )
                row = db.execute(
                    "SELECT * FROM last_verified WHERE database = ?", (database,)
                ).fetchone()
            return _verified(row)

        return await self._call(run)

    async def last_verified(self, database: str) -> VerifiedBackup | None:
        """The newest verified backup recorded for ``database``, if any."""
        sql = "SELECT * FROM last_verified WHERE database = ?"
        return next(iter(await self._select(_verified, sql, database)), None)

    async def all_verified(self) -> dict[str, VerifiedBackup]:
        """Every database's record, by database name."""
        records = await self._select(_verified, "SELECT * FROM last_verified ORDER BY database")
        return {record.database: record for record in records}

    async def forget_verified(self, database: str, backup_id: str) -> bool:
        """Drop the record if it names ``backup_id`` (the backup was deleted)."""
        sql = "DELETE FROM last_verified WHERE database = ? AND backup_id = ?"
        return await self._change(sql, database, backup_id) > 0


# --- opening ----------------------------------------------------------------------------


def _connect(path: Path) -> sqlite3.Connection:
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
    except sqlite3.Error as exc:
        raise StateError(f"cannot open the state database {path}: {exc}") from exc
    db.row_factory = sqlite3.Row
    try:
        _prepare(db, path)
    except BaseException:
        db.close()
        raise
    return db


def _prepare(db: sqlite3.Connection, path: Path) -> None:
    try:
        version, app_id = _versions(db)
        _check(db, path, version, app_id)
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StateError(f"the state database {path} cannot use WAL mode (got {mode})")
        db.execute("PRAGMA synchronous = FULL")
        db.execute("PRAGMA busy_timeout = 5000")
        if version == SCHEMA_VERSION:
            # Added to schema 1 after its first release: databases made before get it
            # here (an index changes no row, so the version stays).
            db.execute("CREATE INDEX IF NOT EXISTS jobs_by_backup ON jobs (backup_id)")
        if version == 0:
            db.execute("BEGIN IMMEDIATE")
            try:
                version, app_id = _versions(db)  # another process may have been first
                _check(db, path, version, app_id)
                if version == 0:
                    # not executescript(): it would COMMIT the BEGIN IMMEDIATE first
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            db.execute(statement)
                    db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
    except sqlite3.DatabaseError as exc:
        raise StateError(f"{path} is not a usable SQLite state database: {exc}") from exc


def _versions(db: sqlite3.Connection) -> tuple[int, int]:
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    app_id = int(db.execute("PRAGMA application_id").fetchone()[0])
    return version, app_id


def _check(db: sqlite3.Connection, path: Path, version: int, app_id: int) -> None:
    if app_id not in (0, APPLICATION_ID):
        raise StateError(
            f"{path} belongs to another application (application_id {app_id:#x}); "
            "point the state directory elsewhere"
        )
    if version > SCHEMA_VERSION:
        raise StateError(
            f"the state database {path} has schema version {version}, newer than this "
            f"vdistream understands ({SCHEMA_VERSION}): it was written by a newer "
            "vdistream. Upgrade vdistream, or move the file away to start afresh."
        )
    if version == 0:
        tables = db.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()
        if tables[0]:
            raise StateError(
                f"{path} holds tables but no vdistream schema version: it is not a "
                "vdistream state database"
            )
