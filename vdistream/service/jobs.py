"""What a client may ask the daemon, the errors it may get back, and how a job looks.

* ``JobRequest``: one backup, restore or verify, as submitted (``JobRequest.from_json``
  checks a decoded JSON body: unknown fields, wrong types and missing fields are
  ``InvalidRequestError`` naming the field).
* ``ServiceError`` and its subclasses carry the HTTP ``status`` and the stable ``code``
  the control API answers with (``{"error": {"code": ..., "message": ...}}``); the
  embedding API raises the same exceptions.
* ``job_view(record, live)``: the JSON form of a job (``GET /v1/jobs/{id}``).
* ``new_backup_id(database)``: the daemon names its backups ``<database>.<UTC time>-<random>``
  so that retention (and ``vdistream prune``) can tell the databases sharing a
  destination apart: database names never contain a ``.``.

Requests name *configured* databases only: a client of the socket cannot make the
daemon read another database, run another command or write to another destination
than its settings name. (A restore target is the exception: it is the request's
business; whoever can reach the socket has the daemon's authority.)
"""

from __future__ import annotations

import dataclasses
import re
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from vdistream.errors import VdistreamError
from vdistream.service.state import JobRecord, JobType
from vdistream.sqlserver.tsql import BACKUP_MODES

__all__ = (
    "BACKUP_ID_PATTERN",
    "LATEST",
    "SQLSERVER_MODES",
    "InvalidRequestError",
    "JobFinishedError",
    "JobRequest",
    "QueueFullError",
    "ServiceError",
    "ShuttingDownError",
    "UnknownDatabaseError",
    "UnknownJobError",
    "backup_prefix",
    "job_view",
    "masked_url",
    "new_backup_id",
)

#: ``backup_id`` of a restore or verify request meaning "the newest backup".
LATEST = "latest"
#: A backup id: one storage key component, at most 128 characters.
BACKUP_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: The ``mode`` of a SQL Server backup request.
SQLSERVER_MODES = BACKUP_MODES
#: A URL's password (user info ``user:password@``), masked in what is stored; greedy
#: to the last ``@`` so that a password holding ``@`` or ``/`` is masked whole.
_URL_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/?#@:]*):.*@", re.DOTALL)


def masked_url(url: str) -> str:
    """``url`` with its password (user info ``user:password@``) masked."""
    return _URL_PASSWORD.sub(r"\1:***@", url)


class ServiceError(VdistreamError):
    """A request the daemon refuses; ``status`` is the HTTP status, ``code`` the stable
    machine-readable name the API answers with (a subclass gives both as class
    arguments: ``class QueueFullError(ServiceError, status=429, code="queue_full")``)."""

    status = 400
    code = "bad_request"

    def __init_subclass__(
        cls, *, status: int | None = None, code: str | None = None, **kwargs: Any
    ) -> None:
        super().__init_subclass__(**kwargs)
        cls.status = cls.status if status is None else status
        cls.code = cls.code if code is None else code


class InvalidRequestError(ServiceError, status=400, code="invalid_request"):
    """The request is malformed: an unknown field, a wrong type, a missing field."""


class UnknownDatabaseError(ServiceError, status=422, code="unknown_database"):
    """The request names a database the settings do not define."""


class UnknownJobError(ServiceError, LookupError, status=404, code="job_not_found"):
    """No job has this id."""


class JobFinishedError(ServiceError, status=409, code="job_finished"):
    """The job already ended; it cannot be aborted."""


class QueueFullError(ServiceError, status=429, code="queue_full"):
    """Every job slot is busy and the queue holds ``service.max_queued`` jobs."""


class ShuttingDownError(ServiceError, status=503, code="shutting_down"):
    """The daemon stopped accepting jobs (it is shutting down)."""


def new_backup_id(database: str, now: datetime | None = None) -> str:
    """``<database>.<YYYYmmddTHHMMSSZ>-<8 hex digits>``: sorts by time within a database."""
    when = (now or datetime.now(UTC)).astimezone(UTC)
    return f"{database}.{when:%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"


def backup_prefix(database: str) -> str:
    """The prefix of every backup id the daemon gives ``database``'s backups."""
    return f"{database}."


#: The fields of a request body, by kind; those in ``_FLAGS`` are booleans, the others
#: strings.
_FIELDS: Mapping[JobType, frozenset[str]] = {
    JobType.BACKUP: frozenset({"source", "destination", "backup_id", "verify", "mode"}),
    JobType.RESTORE: frozenset({"backup_id", "target", "overwrite", "create", "owner", "delta"}),
    JobType.VERIFY: frozenset({"backup_id", "content"}),
}
_FLAGS = frozenset({"verify", "overwrite", "create", "content", "delta"})


@dataclasses.dataclass(frozen=True)
class JobRequest:
    """One job to run (``POST /v1/jobs``, ``Service.submit``).

    * backup: ``database``; optional ``backup_id`` (must start with ``<database>.``;
      default ``new_backup_id``), ``verify`` (default: the database's
      ``verify_after_backup``) and, for a SQL Server database only, ``mode``: ``full``
      (the default), ``diff``, ``log`` or ``copy-only`` (``Admission.resolve`` refuses
      it for the other engines, whose mode is their settings'; it sets ``full`` when a
      SQL Server request names none, so the job record says which backup it was).
      Instead of ``database`` a client may give ``source``
      and ``destination`` (URLs, or a destination's name): the daemon then picks the
      configured database that backs up exactly that source into exactly that
      destination, and refuses when there is none.
    * restore: ``database``, ``target``; optional ``backup_id`` (default ``"latest"``:
      the newest backup of the database), ``overwrite``, ``create``, ``owner``, ``delta``
      (as for ``vdistream restore``).
    * verify: ``database``; optional ``backup_id`` (default ``"latest"``) and
      ``content`` (default true: restore into a temporary place and let the database
      check it; false: checksums only).

    ``trigger`` says who asked (``api``, ``schedule``, ``after-backup``, ``embedded``);
    ``after`` is the backup job a verification follows.
    """

    kind: JobType
    database: str
    backup_id: str | None = None
    verify: bool | None = None
    target: str | None = None
    overwrite: bool = False
    create: bool = False
    owner: str | None = None
    delta: bool = False
    content: bool = True
    source: str | None = None
    destination: str | None = None
    trigger: str = "api"
    after: str | None = None
    mode: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", JobType(self.kind))
        if self.mode is not None:
            if self.kind is not JobType.BACKUP:
                raise InvalidRequestError(f"'mode' is for backups, not for a {self.kind.value}")
            if self.mode not in SQLSERVER_MODES:
                raise InvalidRequestError(
                    f"mode {self.mode!r} is not a SQL Server backup: {', '.join(SQLSERVER_MODES)}"
                )
        backup_id, prefix = self.backup_id, backup_prefix(self.database)
        if self.kind is JobType.RESTORE and not self.target:
            raise InvalidRequestError("a restore needs a 'target' (where to restore to)")
        if backup_id is None or backup_id == LATEST:
            if self.kind is JobType.BACKUP and backup_id == LATEST:
                raise InvalidRequestError("'latest' names an existing backup, not a new one")
            return
        if not BACKUP_ID_PATTERN.fullmatch(backup_id) or ".." in backup_id:
            raise InvalidRequestError(
                f"backup_id {backup_id!r} is not a backup id (letters, digits, "
                "'.', '_' and '-', at most 128 characters)"
            )
        if not self.database or backup_id.startswith(prefix):
            return
        if self.kind is JobType.BACKUP:
            raise InvalidRequestError(
                f"backup_id {backup_id!r}: the backups of database {self.database!r} are "
                f"named {prefix}..., so that retention can tell the databases of a "
                "destination apart"
            )
        if "." in backup_id:
            # Another database's backup: verifying it would mark this one as verified.
            raise InvalidRequestError(
                f"backup_id {backup_id!r} belongs to database "
                f"{backup_id.partition('.')[0]!r}, not to {self.database!r}"
            )

    @classmethod
    def from_json(cls, body: object, *, trigger: str = "api") -> JobRequest:
        """Check a decoded JSON request body; ``InvalidRequestError`` names the field."""
        if not isinstance(body, dict):
            raise InvalidRequestError(
                f"the request body must be a JSON object, not {_json_type(body)}"
            )
        kind_text = body.get("kind")
        if not isinstance(kind_text, str) or kind_text not in {k.value for k in JobType}:
            raise InvalidRequestError(
                f"'kind' must be one of backup, restore, verify (got {kind_text!r})"
            )
        kind = JobType(kind_text)
        allowed = _FIELDS[kind] | {"kind", "database"}
        for name, value in body.items():
            if name not in allowed:
                raise InvalidRequestError(
                    f"unknown field {name!r} for a {kind.value} job "
                    f"(known: {', '.join(sorted(allowed))})"
                )
            wanted = bool if name in _FLAGS else str
            if not isinstance(value, wanted):
                if value is None and name not in ("kind", "database", "target"):
                    continue  # null: the default
                expected = "true or false" if wanted is bool else "a string"
                raise InvalidRequestError(f"{name!r} must be {expected}, not {_json_type(value)}")
        values = {k: v for k, v in body.items() if v is not None and k != "kind"}
        database = values.pop("database", "")
        if kind is JobType.BACKUP and not database:
            if "source" not in values or "destination" not in values:
                raise InvalidRequestError(
                    "a backup needs 'database' (the name of a configured database), or "
                    "'source' and 'destination'"
                )
        elif not database:
            raise InvalidRequestError(
                f"a {kind.value} needs 'database' (the name of a configured database)"
            )
        return cls(kind=kind, database=database, trigger=trigger, **values)

    def params(self) -> dict[str, Any]:
        """What is stored with the job record (no defaults, no secrets)."""
        out: dict[str, Any] = {"trigger": self.trigger}
        for name in ("backup_id", "verify", "target", "owner", "after", "mode"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.target is not None:  # a database URL may hold a password
            out["target"] = masked_url(self.target)
        if self.kind is JobType.RESTORE:
            out["overwrite"] = self.overwrite
            out["create"] = self.create
            if self.delta:  # recorded only when asked, so older records read the same
                out["delta"] = True
        if self.kind is JobType.VERIFY:
            out["content"] = self.content
        return out


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat(timespec="milliseconds")


def job_view(
    record: JobRecord,
    live: Mapping[str, Any] | None = None,
    *,
    queue_position: int | None = None,
    max_rate: int | None = None,
) -> dict[str, Any]:
    """The JSON form of a job: the stored record, with the live per-device progress of
    a running job (``live``) instead of the last stored one; ``max_rate`` is a live
    job's own bandwidth limit in bytes per second (``None``: none, or the job ended)."""
    return {
        "id": record.id,
        "kind": record.kind.value,
        "database": record.database,
        "state": record.state.value,
        "created": _time(record.created),
        "started": _time(record.started),
        "ended": _time(record.ended),
        "backup_id": record.backup_id,
        "storage_url": record.storage_url,
        "params": dict(record.params),
        "progress": dict(live) if live is not None else dict(record.progress),
        "result": None if record.result is None else dict(record.result),
        "error": record.error,
        "queue_position": queue_position,
        "max_rate": max_rate,
    }
