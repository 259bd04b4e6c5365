"""Running one job: a backup, a restore or a verification, to its ``Outcome``.

A ``LiveJob`` is one job while the manager holds it: created by ``Admission`` when a
request is accepted, dropped when the job's end is recorded. It carries its request
and record, the cancel scope and coordinator job of its run, and its abort state.
Aborting a running job (``request_abort``): ``Job.abort(reason)`` on its coordinator
job while it moves (``signal_abort`` on its set, then the bounded drain); a job that
has no coordinator job yet (still resolving its source) or never has one (verify) is
cancelled through its own scope, which the coordinator also turns into a clean abort;
a job whose data is already committed (writing its manifest) is not interrupted. If a
job has not ended ``abort_fallback`` seconds after ``Job.abort``, its scope is
cancelled (``force_if_overdue``).

``JobRunner.run(job, settings)`` records the job ``running`` (with its backup id,
destination and the keys it will write, *before* writing anything) and runs it with
its database's pipeline: ``compress``, ``encrypt_key_file`` and ``encrypt_recipients``
(X25519 public keys) for a backup; the key file or ``decrypt_identity_file`` for
restore and verify (the manifest says the rest). Keys are read from their files when
a job starts, so a rotated key file is picked up without a reload, and they are never
kept in the daemon or the state database. A backup of a database with ``mirror`` is
written to that destination too, in the same pass (its result names it:
``"mirror"``). ``max_rate`` is not the runner's: the manager puts the database's and
the service's limits in effect around the run (``vdistream.throttle.sharing``).

SQL Server databases run the same jobs through the same coordinator (so abort,
shutdown and the watchdogs are the other engines'): a backup of the request's
``mode`` (``full``, ``diff``, ``log``, ``copy-only``) with the database's ``sqlvdi``;
its result carries the ``mode`` and the manifest's ``sqlserver`` facts (type, LSNs).
A verification's content check is SQL Server's own ``RESTORE VERIFYONLY`` on the
database's server (the configured URL, its password found as for a backup). A
restore goes into the request's ``target`` (``mssql://.../newdb``), ``overwrite``
being ``REPLACE``; a chain restore (``--to TIME``) is the command line's.

An ``external:NAME`` database's backup, and a restore to ``external:NAME``, publish
their set in ``service.runtime_dir`` (``service.runtime_group`` may open it) and wait
the database's ``connect_timeout`` for the engine in another process that opens it.

A verification that succeeded of one of the database's own backups (an id
``<database>.…``; a request naming another database's backup is refused) is recorded
as the database's last verified backup (``JobStore.record_verified``) and then the
database's retention runs (``backups.apply_retention``), deleting only backups
strictly older than the newest verified one and never a backup another live job uses.
Its outcome is part of the verification's result (``result["retention"]``).

A job *refused* before it changed anything (a restore onto an existing target without
``overwrite``; a wrong, missing or needless key: ``refusal``) ends ``failed`` like any
failure, but it is not an abort: it counts in ``vdistream_refused_jobs_total{kind,
reason}``, never in ``vdistream_aborts_total`` (the coordinator reports the engine's
refusal as an ``engine`` abort; that is not what happened to the data).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import anyio

from vdistream.catalog import CatalogError, list_manifests, read_manifest
from vdistream.coordinator import AbortCause, Job, JobStatus, stream_key
from vdistream.engines import TargetExistsError
from vdistream.engines.external import ExternalOptions
from vdistream.errors import (
    ConfigError,
    KeyMissingError,
    KeyNotNeededError,
    VdistreamError,
    WrongKeyError,
)
from vdistream.log import get_logger
from vdistream.operations import (
    BackupSettings,
    KeySource,
    SqlRestoreOptions,
    run_backup,
    run_chain_restore,
    run_restore,
    run_verify,
)
from vdistream.service.backups import (
    apply_retention,
    backup_ended,
    delete_backup,
    group_of,
    verified_ids,
)
from vdistream.service.jobs import LATEST, JobRequest, UnknownDatabaseError, new_backup_id
from vdistream.service.metrics import Metrics
from vdistream.service.progress import MOVING, JobProgress
from vdistream.service.settings import DatabaseSettings, DestinationSettings, Settings
from vdistream.service.state import JobRecord, JobState, JobStore, JobType
from vdistream.sqlserver.url import MssqlURL
from vdistream.storage import Storage, open_storage

__all__ = ("JobRunner", "LiveJob", "Outcome", "refusal")

log = get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a job ended, as recorded and counted."""

    state: JobState
    result: dict[str, Any] | None = None
    error: str | None = None
    #: the AbortCause value when the job was aborted or failed through an abort
    cause: str | None = None
    #: why the job was refused before it changed anything (``refusal``), if it was
    refused: str | None = None


@dataclasses.dataclass(eq=False)
class LiveJob:
    """A job that is queued or running (module doc)."""

    request: JobRequest
    record: JobRecord
    #: whether ``record`` is in the store yet (``submit`` stores it after admission)
    stored: bool = False
    scope: anyio.CancelScope | None = None
    coordinator: Job | None = None
    abort_reason: str | None = None
    abort_cause: AbortCause = AbortCause.USER
    abort_at: float | None = None
    #: set once the job's end is being recorded (``JobManager._finish``)
    finished: bool = False
    started_at: float | None = None
    progress: JobProgress = dataclasses.field(default_factory=JobProgress)

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def database(self) -> str:
        return self.record.database

    def attach(self, job: Job) -> None:
        """The ``on_job`` hook of ``operations``: the run's coordinator job."""
        self.coordinator = job

    def sample(self, metrics: Metrics) -> dict[str, Any] | None:
        """The live progress now (``JobProgress.sample``)."""
        return self.progress.sample(self.coordinator, self.database, metrics)

    def abort_queued(self, reason: str, cause: AbortCause) -> Outcome:
        """Record the abort of a job that never started; its outcome."""
        self.abort_reason, self.abort_cause = reason, cause
        return self.cancelled_outcome()

    def request_abort(self, reason: str, cause: AbortCause = AbortCause.USER) -> None:
        """Abort the running job (module doc); the first reason wins."""
        if self.abort_reason is None:
            self.abort_reason, self.abort_cause = reason, cause
            self.abort_at = anyio.current_time()
        job = self.coordinator
        if job is not None and job.status in MOVING:
            job.abort(reason, cause=cause)
        elif job is None or job.status is JobStatus.PENDING:
            if self.scope is not None:
                self.scope.cancel()
            # else: the runner cancels its scope as soon as it enters it
        else:
            log.info("job_abort_too_late", job_id=self.id, status=job.status.value)

    def cancel(self, reason: str) -> None:
        """Cancel the run at once (a forced shutdown); its coordinator still cleans up."""
        if self.abort_reason is None:
            self.abort_reason, self.abort_cause = reason, AbortCause.SHUTDOWN
        if self.scope is not None:
            self.scope.cancel()

    def force_if_overdue(self, now: float, fallback: float) -> None:
        """Cancel the scope of a job still running ``fallback`` seconds after its abort."""
        overdue = self.abort_at is not None and now - self.abort_at > fallback
        if overdue and self.scope is not None and not self.scope.cancel_called:
            log.warning("job_abort_forced", job_id=self.id)
            self.scope.cancel()

    def cancelled_outcome(self) -> Outcome:
        """The ``aborted`` outcome: the abort's reason and cause, else the daemon's stop."""
        reason = self.abort_reason or "cancelled: the daemon stopped"
        cause = self.abort_cause if self.abort_reason else AbortCause.CANCELLED
        return Outcome(JobState.ABORTED, error=reason, cause=cause.value)


#: Errors that refuse a job before it changes anything, and their metric label.
_REFUSALS: tuple[tuple[type[BaseException], str], ...] = (
    (TargetExistsError, "target_exists"),
    (WrongKeyError, "wrong_key"),
    (KeyMissingError, "key_missing"),
    (KeyNotNeededError, "key_not_needed"),
)


def refusal(error: BaseException | None) -> str | None:
    """The ``_REFUSALS`` label of ``error`` or of an error it was raised from."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        for kind, label in _REFUSALS:
            if isinstance(error, kind):
                return label
        error = error.__cause__ or error.__context__
    return None


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobRunner:
    """Runs jobs (module doc). ``changed()`` is called when a job starts running;
    ``in_use(database, job)`` names the backups the other live jobs use."""

    store: JobStore
    metrics: Metrics
    changed: Callable[[], None]
    in_use: Callable[[str, LiveJob], set[str]]

    async def run(self, job: LiveJob, settings: Settings) -> Outcome:
        """Run ``job`` in a cancel scope of its own (``LiveJob.scope``); its outcome.
        An error nobody translated is recorded as an internal error."""
        try:
            with anyio.CancelScope() as scope:
                job.scope = scope
                if job.abort_reason is not None:
                    scope.cancel()
                return await self._execute(job, settings)
        except Exception as exc:  # a bug, or an error nobody translated: recorded
            log.exception("job_crashed", error=repr(exc))
            return Outcome(JobState.FAILED, error=f"internal error: {exc!r}")
        return job.cancelled_outcome()  # its own scope was cancelled: an abort

    async def _execute(self, job: LiveJob, settings: Settings) -> Outcome:
        try:
            database = settings.databases.get(job.database)
            if database is None:
                raise UnknownDatabaseError(
                    f"database {job.database!r} was removed from the settings "
                    "while the job was queued"
                )
            kinds = {JobType.BACKUP: self._backup, JobType.RESTORE: self._restore}
            return await kinds.get(job.request.kind, self._verify)(job, database, settings)
        except (VdistreamError, OSError) as exc:
            return Outcome(JobState.FAILED, error=str(exc), refused=refusal(exc))

    async def _pick(
        self, job: LiveJob, database: DatabaseSettings, settings: Settings
    ) -> tuple[DestinationSettings, str]:
        """The backup a restore or verification reads (recorded as it starts)."""
        destination = settings.destinations[database.destination]
        backup_id = await _pick_backup(database, destination, job.request.backup_id)
        await self._started(job, backup_id=backup_id, storage_url=destination.display_url)
        return destination, backup_id

    async def _started(self, job: LiveJob, **fields: Any) -> None:
        job.started_at = anyio.current_time()
        job.record = await self.store.update(job.id, state=JobState.RUNNING, **fields)
        log.info("job_running", kind=job.record.kind.value, backup_id=job.record.backup_id)
        self.changed()

    async def _backup(
        self, job: LiveJob, database: DatabaseSettings, settings: Settings
    ) -> Outcome:
        destination = settings.destinations[database.destination]
        backup_id = job.request.backup_id or new_backup_id(database.name)
        keys = [stream_key(backup_id, i, database.devices) for i in range(database.devices)]
        # the mirror is recorded as the job starts: a restart after a crash cleans it too
        mirrored = {} if database.mirror is None else {"result": {"mirror": database.mirror}}
        await self._started(
            job,
            backup_id=backup_id,
            storage_url=destination.display_url,
            add_storage_keys=keys,
            **mirrored,
        )
        sqlserver = database.kind == "mssql"
        options = BackupSettings(
            devices=database.devices,
            # SQL Server: the request's kind of backup (Admission sets "full")
            mode=job.request.mode if sqlserver else database.mode,
            backup_id=backup_id,
            compression=database.compress if database.compress.enabled else None,
            encryption=_keys(database),
            workdir=settings.service.work_dir,
            sqlvdi=_library(database),
            external=_external(database, settings) if database.kind == "external" else None,
            mirror=None if database.mirror is None else settings.destinations[database.mirror].url,
        )
        outcome = await run_backup(database.url, destination.url, options, on_job=job.attach)
        result = {**outcome.summary(), "destination": destination.name}
        if database.mirror is not None:
            result["mirror"] = database.mirror
        if sqlserver:
            result["mode"] = options.mode
            if outcome.manifest is not None and outcome.manifest.sqlserver is not None:
                result["sqlserver"] = outcome.manifest.sqlserver
        if outcome.ok:
            return Outcome(JobState.SUCCEEDED, result)
        ended = outcome.result
        state = JobState.ABORTED if ended.status is JobStatus.ABORTED else JobState.FAILED
        return Outcome(state, result, str(ended.error), _cause(ended.aborted_by))

    async def _restore(
        self, job: LiveJob, database: DatabaseSettings, settings: Settings
    ) -> Outcome:
        request = job.request
        assert request.target is not None
        if database.kind == "mssql":
            _check_sqlserver_target(database, request.target)
            if request.backup_id in (None, LATEST):
                return await self._restore_chain(job, database, settings)
        destination, backup_id = await self._pick(job, database, settings)
        sqlserver = None
        if database.kind == "mssql":
            sqlserver = SqlRestoreOptions(replace=request.overwrite, sqlvdi=_library(database))
        result = await run_restore(
            _ref(destination, backup_id),
            request.target,
            overwrite=request.overwrite,
            create=request.create,
            owner=request.owner,
            keys=_keys(database),
            on_job=job.attach,
            sqlserver=sqlserver,
            delta=request.delta,
            external=_external(database, settings),
        )
        summary = {
            "id": backup_id,
            "status": result.status.value,
            "target": job.record.params.get("target", request.target),  # password masked
            "bytes": result.bytes,
            "seconds": round(result.duration, 3),
            "error": None if result.ok else str(result.error),
            "aborted_by": _cause(result.aborted_by),
        }
        if result.ok:
            return Outcome(JobState.SUCCEEDED, summary)
        state = JobState.ABORTED if result.status is JobStatus.ABORTED else JobState.FAILED
        refused = refusal(result.error) if state is JobState.FAILED else None
        # An engine that refused to start did not abort anything: no cause.
        cause = _cause(result.aborted_by) if refused is None else None
        return Outcome(state, summary, str(result.error), cause, refused)

    async def _restore_chain(
        self, job: LiveJob, database: DatabaseSettings, settings: Settings
    ) -> Outcome:
        """SQL Server's "latest": the chain (full, latest differential, logs) to the
        latest point the destination reaches, not the newest backup (a log, mostly)."""
        request = job.request
        assert request.target is not None
        destination = settings.destinations[database.destination]
        await self._started(job, storage_url=destination.display_url)
        outcome = await run_chain_restore(
            destination.url,
            request.target,
            to=None,
            database=MssqlURL.parse(database.url).database,
            replace=request.overwrite,
            sqlvdi=_library(database),
            keys=_keys(database),
            on_job=job.attach,
        )
        summary = {
            "id": outcome.steps[-1][1].backup_id if outcome.steps else None,
            "status": "succeeded" if outcome.ok else "failed",
            "target": job.record.params.get("target", request.target),  # password masked
            "steps": [
                {"id": r.backup_id, "kind": step.kind, "status": r.status.value}
                for step, r in outcome.steps
            ],
            "bytes": outcome.bytes,
            "error": None if outcome.ok else str(outcome.error),
        }
        if outcome.ok:
            return Outcome(JobState.SUCCEEDED, summary)
        last = outcome.steps[-1][1] if outcome.steps else None
        aborted = last is not None and last.status is JobStatus.ABORTED
        state = JobState.ABORTED if aborted else JobState.FAILED
        cause = _cause(last.aborted_by) if last is not None else None
        return Outcome(state, summary, str(outcome.error), cause)

    async def _verify(
        self, job: LiveJob, database: DatabaseSettings, settings: Settings
    ) -> Outcome:
        destination, backup_id = await self._pick(job, database, settings)
        sqlserver = database.kind == "mssql" and job.request.content
        report = await run_verify(
            _ref(destination, backup_id),
            content=job.request.content,
            keys=_keys(database),
            workdir=settings.service.work_dir,
            # SQL Server checks the content itself: RESTORE VERIFYONLY on its server
            engine=sqlserver,
            server=database.url if sqlserver else None,
            sqlvdi=_library(database),
        )
        result: dict[str, Any] = report.summary()
        if not report.ok:
            bad = next((c for c in report.checks if not c.ok), None)
            error = f"{bad.name}: {bad.detail}" if bad is not None else "nothing was checked"
            return Outcome(JobState.FAILED, result, f"backup {backup_id} failed to verify: {error}")
        if group_of(backup_id) != database.name:
            # A backup made by hand in the destination: verified, but it is not one of
            # the database's own, so neither the gauge nor retention counts it.
            result["recorded"] = False
            return Outcome(JobState.SUCCEEDED, result)
        async with open_storage(destination.url) as storage:
            manifest = await read_manifest(storage, backup_id)
            await self.store.record_verified(
                database.name, backup_id, backup_ended=backup_ended(manifest), job_id=job.id
            )
            if database.retention.enabled:
                result["retention"] = await self._retention(job, storage, database, backup_id)
                if database.mirror is not None:
                    mirror = settings.destinations[database.mirror]
                    deleted = result["retention"].get("deleted", [])
                    result["retention"]["mirror_deleted"] = await self._prune_mirror(
                        mirror, database, deleted
                    )
        return Outcome(JobState.SUCCEEDED, result)

    async def _prune_mirror(
        self, mirror: DestinationSettings, database: DatabaseSettings, deleted: list[str]
    ) -> list[str]:
        """The backups retention deleted from the destination, deleted from the mirror
        too (the mirror holds the same backups; without this it would only grow). One
        that is not there is no error; one that cannot be deleted is logged and stays
        for the next run."""
        gone: list[str] = []
        if not deleted:
            return gone
        async with open_storage(mirror.url) as storage:
            for backup_id in deleted:
                done = await delete_backup(storage, backup_id)
                if done.error is None:
                    gone.append(backup_id)
                    log.info(
                        "backup_deleted",
                        database=database.name,
                        backup_id=backup_id,
                        destination=mirror.display_url,
                    )
                else:
                    log.error(
                        "backup_delete_failed",
                        database=database.name,
                        backup_id=backup_id,
                        destination=mirror.display_url,
                        error=done.error,
                    )
        return gone

    async def _retention(
        self, job: LiveJob, storage: Storage, database: DatabaseSettings, backup_id: str
    ) -> dict[str, Any]:
        manifests, problems = await list_manifests(storage)
        present = [m.backup_id for m in manifests if group_of(m.backup_id) == database.name]
        verified = await verified_ids(self.store, database.name, present)
        verified.add(backup_id)  # this job: still "running" in the store
        outcome = await apply_retention(
            storage,
            manifests,
            database.name,
            database.retention,
            verified,
            in_use=self.in_use(database.name, job),
        )
        deleted = [d for d in outcome.deleted if d.error is None]
        if deleted:
            self.metrics.retention_deleted.labels(database.name).inc(len(deleted))
        log.info(
            "retention_applied",
            kept=len(outcome.plan.keep),
            deleted=[d.backup_id for d in deleted],
            failed=len(outcome.deleted) - len(deleted),
        )
        summary = outcome.summary()
        if problems:
            summary["unreadable_manifests"] = problems
        return summary


async def _pick_backup(
    database: DatabaseSettings, destination: DestinationSettings, wanted: str | None
) -> str:
    if wanted is not None and wanted != LATEST:
        return wanted
    async with open_storage(destination.url) as storage:
        manifests, _ = await list_manifests(storage)
    mine = [m for m in manifests if group_of(m.backup_id) == database.name]
    if not mine:
        raise CatalogError(
            f"database {database.name} has no backup in {destination.display_url} yet"
        )
    return max(mine, key=lambda m: (backup_ended(m), m.backup_id)).backup_id


def _keys(database: DatabaseSettings) -> KeySource | None:
    """The database's key source; the keys themselves are read per job, never kept. It
    is optional: the database's older, unencrypted backups still restore and verify."""
    identity = database.decrypt_identity_file
    if not database.encrypted and identity is None:
        return None
    # recipients and identity_file: KeySource's envelope encryption ("keys"); given
    # only when set, so a database without them needs nothing new of KeySource
    envelope: dict[str, Any] = {}
    if database.encrypt_recipients:
        envelope["recipients"] = tuple(str(p) for p in database.encrypt_recipients)
    if identity is not None:
        envelope["identity_file"] = str(identity)
    key_file = database.encrypt_key_file
    return KeySource(
        key_file=None if key_file is None else str(key_file), optional=True, **envelope
    )


def _check_sqlserver_target(database: DatabaseSettings, target: str) -> None:
    """A restore target an API client names must be on the configured database's
    server, and may not name a password file: the daemon would otherwise send its
    password (or a file's first line) wherever a request points."""
    if "password_file=" in target:
        raise ConfigError(
            "a restore target may not name a password_file: the daemon uses the "
            "password of its settings"
        )
    wanted, given = MssqlURL.parse(database.url), MssqlURL.parse(target)
    if (given.host.lower(), given.port) != (wanted.host.lower(), wanted.port):
        raise ConfigError(
            f"restore target {given.display!r} is not on {wanted.host},{wanted.port}, the "
            f"server of database {database.name}: the daemon restores only onto it"
        )


def _external(database: DatabaseSettings, settings: Settings) -> ExternalOptions:
    """Where the daemon publishes the sets of ``external:NAME`` (a database's source or
    a restore's target), who may open them, how long they wait for their engine."""
    service = settings.service
    return ExternalOptions(
        directory=service.runtime_dir,
        group=int(group) if (group := service.runtime_group) and group.isdigit() else group,
        connect_timeout=database.connect_timeout,
    )


def _library(database: DatabaseSettings) -> str | None:
    """The database's ``libsqlvdi.so`` (SQL Server), as ``operations`` takes it."""
    return None if database.sqlvdi is None else str(database.sqlvdi)


def _ref(destination: DestinationSettings, backup_id: str) -> str:
    return f"{destination.url.rstrip('/')}/{backup_id}"


def _cause(cause: AbortCause | None) -> str | None:
    return None if cause is None else cause.value
