"""Admission: which request becomes a job, which job starts now and which waits.

* At most ``service.max_jobs`` jobs run at once, and at most ``max_jobs`` of one
  database. A job that cannot start at once waits in a FIFO queue; a later job of
  another database may start first when its own database has room.
* The queue is bounded: a request that cannot start at once while
  ``service.max_queued`` jobs already wait is refused (``QueueFullError``, HTTP 429),
  and so is any request once ``max_jobs + max_queued`` jobs are live. Nothing is
  recorded for a refused request. The one exception is the verification the manager
  itself queues after each backup (``internal``): it is never refused, so at most
  ``max_jobs`` more jobs can wait than ``max_queued`` says.
* A request names a configured database, or (a backup) the source and destination of
  exactly one configured database (``UnknownDatabaseError`` otherwise). A SQL Server
  URL matches the configured one with the same user, host, port and database (its
  password and trigger aside).
* A backup's ``mode`` is SQL Server's (``full``, ``diff``, ``log``, ``copy-only``):
  refused for the other engines (``InvalidRequestError``), ``full`` when a SQL Server
  request names none.
"""

from __future__ import annotations

import dataclasses

from vdistream.service.jobs import (
    InvalidRequestError,
    JobRequest,
    QueueFullError,
    UnknownDatabaseError,
    masked_url,
)
from vdistream.service.runners import LiveJob
from vdistream.service.settings import DatabaseSettings, Settings
from vdistream.service.state import JobRecord, JobType
from vdistream.sqlserver.url import PASSWORD_VARIABLES, MssqlURL, MssqlURLError

__all__ = ("Admission",)


class Admission:
    """The live jobs: queued (FIFO) and running, and the limits between them."""

    def __init__(self) -> None:
        self._queued: list[LiveJob] = []
        self._running: dict[str, LiveJob] = {}
        self._live: dict[str, LiveJob] = {}

    @property
    def counts(self) -> dict[str, int]:
        return {"queued": len(self._queued), "running": len(self._running)}

    def get(self, job_id: str) -> LiveJob | None:
        return self._live.get(job_id)

    def ids(self) -> list[str]:
        """Ids of the jobs queued or running, oldest first."""
        return list(self._live)

    def queued(self) -> list[LiveJob]:
        return list(self._queued)

    def running(self) -> list[LiveJob]:
        return list(self._running.values())

    def position(self, job: LiveJob) -> int | None:
        """Where ``job`` waits in the queue (``None``: it does not wait)."""
        return self._queued.index(job) if job in self._queued else None

    def backups_in_use(self, database: str, but: LiveJob) -> set[str]:
        """The backups the live jobs of ``database`` other than ``but`` use."""
        used = {
            job.record.backup_id or job.request.backup_id
            for job in self._live.values()
            if job is not but and job.database == database
        }
        return {b for b in used if b}

    # --- accepting --------------------------------------------------------------------

    def resolve(
        self, settings: Settings, request: JobRequest
    ) -> tuple[JobRequest, DatabaseSettings]:
        """The request with its database named (and a SQL Server backup's mode), and
        that database's settings."""
        databases = settings.databases
        if not request.database:
            database = _match_source(settings, request)
            request = dataclasses.replace(request, database=database.name)
        else:
            found = databases.get(request.database)
            if found is None:
                known = ", ".join(sorted(databases)) or "none"
                raise UnknownDatabaseError(
                    f"no database {request.database!r} in the settings (configured: {known})"
                )
            database = found
        if request.kind is JobType.BACKUP and database.kind == "mssql" and request.mode is None:
            request = dataclasses.replace(request, mode="full")
        elif request.mode is not None and database.kind != "mssql":
            raise InvalidRequestError(
                f"'mode' {request.mode!r} is for SQL Server databases; database "
                f"{database.name!r} is {database.kind}, its backups are as its settings say"
            )
        return request, database

    def admit(
        self,
        settings: Settings,
        request: JobRequest,
        database: DatabaseSettings,
        *,
        internal: bool = False,
    ) -> LiveJob:
        """Queue a new job (not stored yet) or refuse it (``QueueFullError``)."""
        service = settings.service
        if not internal:
            blocked = sum(1 for job in self._queued if job.stored)
            if len(self._live) >= service.max_jobs + service.max_queued or (
                not self._slot_free(settings, database) and blocked >= service.max_queued
            ):
                raise QueueFullError(
                    f"no room for another job: {len(self._running)} running "
                    f"(service.max_jobs = {service.max_jobs}, databases.{database.name}."
                    f"max_jobs = {database.max_jobs}) and {blocked} queued "
                    f"(service.max_queued = {service.max_queued}); try again later"
                )
        params = {**request.params(), "destination": database.destination}
        job = LiveJob(request, JobRecord.new(request.kind, database.name, params=params))
        self._queued.append(job)
        self._live[job.id] = job
        return job

    def _slot_free(self, settings: Settings, database: DatabaseSettings) -> bool:
        """Whether a job of ``database`` submitted now would start without waiting."""
        pending = [job for job in self._queued if not job.stored]
        running = len(self._running) + len(pending)
        mine = sum(1 for job in self._running.values() if job.database == database.name)
        mine += sum(1 for job in pending if job.database == database.name)
        waiting = any(job.stored and job.database == database.name for job in self._queued)
        return running < settings.service.max_jobs and mine < database.max_jobs and not waiting

    # --- moving -----------------------------------------------------------------------

    def dequeue(self, job: LiveJob) -> bool:
        """Take a queued job out of the queue (it is still live); whether it was queued."""
        if job not in self._queued:
            return False
        self._queued.remove(job)
        return True

    def startable(self, settings: Settings) -> list[LiveJob]:
        """Move the queued jobs that may start now to the running ones (FIFO, within the
        limits); returns them."""
        started = []
        for job in list(self._queued):
            if len(self._running) >= settings.service.max_jobs:
                break
            if not job.stored or job.abort_reason is not None:
                continue
            database = settings.databases.get(job.database)
            per_database = database.max_jobs if database is not None else 1
            busy = sum(1 for other in self._running.values() if other.database == job.database)
            if busy >= per_database:
                continue
            self._queued.remove(job)
            self._running[job.id] = job
            started.append(job)
        return started

    def release(self, job: LiveJob) -> None:
        """Forget a job that ended (or was never stored)."""
        if job in self._queued:
            self._queued.remove(job)
        self._running.pop(job.id, None)
        self._live.pop(job.id, None)


def _match_source(settings: Settings, request: JobRequest) -> DatabaseSettings:
    source, destination = request.source or "", request.destination or ""
    for database in settings.databases.values():
        dest = settings.destinations[database.destination]
        if _same_url(database.url, source) and (
            destination == dest.name or _same_url(dest.url, destination)
        ):
            return database
    raise UnknownDatabaseError(
        f"no configured database backs up {masked_url(source)!r} into "
        f"{masked_url(destination)!r}: the daemon "
        "runs only the databases of its settings (add a [databases.NAME] table, or run "
        "the backup without the daemon)"
    )


def _same_url(configured: str, given: str) -> bool:
    """Whether a client's URL or path names the same thing as a configured one."""
    if _sqlserver(configured) is not None:
        return _sqlserver(configured) == _sqlserver(given)

    def normal(text: str) -> str:
        text = text.strip()
        if text.startswith("file://"):
            text = text[len("file://") :]
        if text.startswith("sqlite:") and not text.startswith("sqlite://"):
            text = "sqlite://" + text[len("sqlite:") :]
        return text.rstrip("/") or "/"

    return normal(configured) == normal(given)


def _sqlserver(url: str) -> tuple[str, str, int, str] | None:
    """The user, host, port and database of a SQL Server URL (``None``: not one, or
    malformed). The password plays no part: a stand-in keeps the parse from looking."""
    try:
        parsed = MssqlURL.parse(url.strip(), password_env={PASSWORD_VARIABLES[0]: "-"})
    except MssqlURLError:
        return None
    return parsed.user, parsed.host.lower(), parsed.port, parsed.database
