"""The job manager: admission, queueing, running, aborting and recording jobs.

``JobManager(store, settings, metrics)`` runs backup, restore and verify jobs inside
its own task group (``await tg.start(manager.run)``); every job is one task of that
group, and the group outlives them all.

Admission and queueing
----------------------

* At most ``service.max_jobs`` jobs run at once, and at most ``max_jobs`` of one
  database. A job that cannot start at once waits in a FIFO queue; a later job of
  another database may start first when its own database has room.
* The queue is bounded: a request that cannot start at once while
  ``service.max_queued`` jobs already wait is refused (``QueueFullError``, HTTP 429),
  and so is any request once ``max_jobs + max_queued`` jobs are live. Nothing is
  recorded for a refused request. The one exception is the verification the manager
  itself queues after each backup (``verify_after_backup``): it is never refused, so
  at most ``max_jobs`` more jobs can wait than ``max_queued`` says.
* ``close_intake()`` (shutdown) refuses every new request with ``ShuttingDownError``.

Recording
---------

A job is stored (``JobStore``) when accepted (``queued``), again when it starts
(``running``, with its backup id, destination and the keys it will write, *before*
writing anything), every ``persist_every`` seconds with its per-device progress, and
when it ends (``succeeded``, ``failed`` or ``aborted``, with its result and error). The
final write is shielded, so a job cancelled by a forced shutdown is still recorded.
At start, ``recover()`` marks the jobs of a previous run that never ended as failed
(``JobStore.mark_interrupted``) and removes what they left: their backups' partial
storage (``backups.remove_partial_backup``), their restores' temporary files beside
the target, and everything in ``service.work_dir``, where verifications and SQLite
snapshots stage their data. Jobs that ended longer than ``service.job_history`` ago
are forgotten at start and every hour, except each backup's latest verification,
which retention still asks.

Aborting
--------

``abort(job_id, reason)``: a queued job ends ``aborted`` at once; a running backup or
restore gets ``Job.abort(reason)`` on its coordinator job (``signal_abort`` on its set,
then the bounded drain), which ends it ``aborted`` with nothing of it left in storage.
A job that has no coordinator job yet (still resolving its source) or never has one
(verify) is cancelled through its own cancel scope, which the coordinator also turns
into a clean abort. A job whose data is already committed (writing its manifest) is
not interrupted: it ends as it would have. If a job has not ended ``abort_fallback``
seconds after ``Job.abort``, its scope is cancelled.

After a job
-----------

* a backup that succeeded is followed by a verification of it (request ``verify``,
  default the database's ``verify_after_backup``);
* a verification that succeeded of one of the database's own backups (an id
  ``<database>.…``; a request naming another database's backup is refused) is
  recorded as the database's last verified backup (``JobStore.record_verified``) and
  then the database's retention runs (``backups.apply_retention``), deleting only
  backups strictly older than the newest verified one and never a backup another live
  job uses. Its outcome is part of the verification's result (``result["retention"]``).

Each job uses its database's pipeline: ``compress`` and ``encrypt_key_file`` for a
backup; the key file again for restore and verify (the manifest says the rest). The
key is read from its file when a job starts, so a rotated key file is picked up
without a reload, and it is never kept in the manager or the state database.

A job *refused* before it changed anything (a restore onto an existing target without
``overwrite``; a wrong, missing or needless key: ``_refusal``) ends ``failed`` like any
failure, but it is not an abort: it counts in ``vdistream_refused_jobs_total{kind,
reason}``, never in ``vdistream_aborts_total`` (the coordinator reports the engine's
refusal as an ``engine`` abort; that is not what happened to the data).
"""

from __future__ import annotations

import dataclasses
import shutil
from collections import defaultdict
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import structlog

from vdistream.catalog import CatalogError, list_manifests, read_manifest
from vdistream.coordinator import AbortCause, Job, JobStatus, stream_key
from vdistream.engines import TargetExistsError
from vdistream.engines.files import remove_stale_partials
from vdistream.engines.streams import partial_path
from vdistream.errors import KeyMissingError, KeyNotNeededError, VdistreamError, WrongKeyError
from vdistream.log import get_logger
from vdistream.operations import BackupSettings, KeySource, run_backup, run_restore, run_verify
from vdistream.service.backups import (
    apply_retention,
    backup_ended,
    group_of,
    remove_partial_backup,
    verified_ids,
)
from vdistream.service.jobs import (
    LATEST,
    JobFinishedError,
    JobRequest,
    QueueFullError,
    ServiceError,
    ShuttingDownError,
    UnknownDatabaseError,
    UnknownJobError,
    job_view,
    new_backup_id,
)
from vdistream.service.metrics import Metrics
from vdistream.service.settings import DatabaseSettings, DestinationSettings, Settings
from vdistream.service.state import (
    JobNotFoundError,
    JobRecord,
    JobState,
    JobStore,
    JobType,
    StateError,
)
from vdistream.storage import open_storage

__all__ = ("JobManager",)

log = get_logger(__name__)

_MOVING = (JobStatus.RUNNING, JobStatus.COMMITTING)
#: bound of one state-database write on the way out of a job (shielded)
_STORE_TIMEOUT = 30.0
#: how often ended jobs older than ``service.job_history`` are forgotten (seconds)
_PRUNE_EVERY = 3600.0


@dataclasses.dataclass(frozen=True)
class _Outcome:
    state: JobState
    result: dict[str, Any] | None = None
    error: str | None = None
    #: the AbortCause value when the job was aborted or failed through an abort
    cause: str | None = None
    #: why the job was refused before it changed anything (``_refusal``), if it was
    refused: str | None = None


#: Errors that refuse a job before it changes anything, and their metric label.
_REFUSALS: tuple[tuple[type[BaseException], str], ...] = (
    (TargetExistsError, "target_exists"),
    (WrongKeyError, "wrong_key"),
    (KeyMissingError, "key_missing"),
    (KeyNotNeededError, "key_not_needed"),
)


def _refusal(error: BaseException | None) -> str | None:
    """The ``_REFUSALS`` label of ``error`` or of an error it was raised from."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        for kind, label in _REFUSALS:
            if isinstance(error, kind):
                return label
        error = error.__cause__ or error.__context__
    return None


@dataclasses.dataclass(eq=False)
class _Active:
    """A job that is queued or running (the manager's live view of it)."""

    request: JobRequest
    record: JobRecord
    done: anyio.Event
    stored: bool = False
    scope: anyio.CancelScope | None = None
    coordinator: Job | None = None
    abort_reason: str | None = None
    abort_cause: AbortCause = AbortCause.USER
    abort_at: float | None = None
    finished: bool = False
    live: dict[str, Any] | None = None
    #: per device index: (bytes, commands) already counted in the metrics
    counted: dict[int, tuple[int, int]] = dataclasses.field(default_factory=dict)
    started_at: float | None = None

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def database(self) -> str:
        return self.record.database


class JobManager:
    """Runs jobs within the limits of ``settings`` and records them in ``store``.

    ``tick`` is the progress sampling interval (metrics, live progress, abort
    fallback); progress is written to the store every ``persist_every`` seconds.
    """

    def __init__(
        self,
        store: JobStore,
        settings: Settings,
        metrics: Metrics,
        *,
        tick: float = 1.0,
        persist_every: float = 5.0,
        abort_fallback: float = 20.0,
    ) -> None:
        self._store = store
        self._settings = settings
        self._metrics = metrics
        self._tick_interval = tick
        self._persist_every = persist_every
        self._abort_fallback = abort_fallback
        self._queued: list[_Active] = []
        self._running: dict[str, _Active] = {}
        self._live: dict[str, _Active] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self._intake_open = False
        self._closing = False
        self._change = anyio.Event()
        self._started_at = datetime.now(UTC)

    # --- properties -------------------------------------------------------------------

    @property
    def settings(self) -> Settings:
        return self._settings

    @property
    def accepting(self) -> bool:
        """Whether new jobs are accepted (the manager runs and intake is open)."""
        return self._intake_open

    @property
    def counts(self) -> dict[str, int]:
        return {"queued": len(self._queued), "running": len(self._running)}

    # --- lifecycle --------------------------------------------------------------------

    async def recover(self) -> list[JobRecord]:
        """Mark the jobs a previous run left queued or running as failed and remove
        what they left: the partial storage of backups, the partial files of restores,
        everything in the work directory (module doc). Call once, before ``run``."""
        work = self._settings.service.work_dir
        await anyio.to_thread.run_sync(_empty_dir, work)
        await self._prune_history()
        interrupted = await self._store.mark_interrupted()
        for record in interrupted:
            log.warning(
                "job_interrupted",
                job_id=record.id,
                kind=record.kind.value,
                database=record.database,
                backup_id=record.backup_id,
            )
            if record.kind is JobType.RESTORE:
                removed = await anyio.to_thread.run_sync(
                    _remove_partial_target, record.params.get("target")
                )
                await self._store.update(
                    record.id,
                    result={**dict(record.result or {}), "cleanup": {"removed": removed}},
                )
                continue
            if record.kind is not JobType.BACKUP or record.backup_id is None:
                continue
            url = self._storage_url_of(record)
            if url is None:
                log.error(
                    "partial_backup_not_removed",
                    job_id=record.id,
                    backup_id=record.backup_id,
                    reason="its destination is no longer configured",
                    storage_url=record.storage_url,
                )
                continue
            try:
                with anyio.fail_after(60):
                    async with open_storage(url) as storage:
                        cleanup = await remove_partial_backup(
                            storage,
                            record.backup_id,
                            started=record.started,
                            before=self._started_at,
                        )
            except (VdistreamError, OSError, TimeoutError) as exc:
                cleanup = {"error": f"cannot remove the partial backup: {exc}"}
                log.error("partial_backup_not_removed", job_id=record.id, error=str(exc))
            else:
                log.info(
                    "partial_backup_removed",
                    job_id=record.id,
                    backup_id=record.backup_id,
                    removed=len(cleanup.get("removed", ())),
                    committed=cleanup.get("committed"),
                )
            await self._store.update(
                record.id, result={**dict(record.result or {}), "cleanup": cleanup}
            )
        return interrupted

    async def _prune_history(self) -> None:
        """Forget jobs that ended longer than ``service.job_history`` ago."""
        history = self._settings.service.job_history
        if history is None:
            return
        try:
            with anyio.move_on_after(_STORE_TIMEOUT):
                forgotten = await self._store.delete_finished(datetime.now(UTC) - history)
                if forgotten:
                    log.info("job_history_pruned", forgotten=forgotten, older_than=str(history))
        except StateError as exc:
            log.warning("job_history_not_pruned", error=str(exc))

    def _storage_url_of(self, record: JobRecord) -> str | None:
        name = record.params.get("destination")
        if isinstance(name, str) and name in self._settings.destinations:
            destination = self._settings.destinations[name]
            if record.storage_url in (None, destination.display_url):
                return destination.url
        if record.storage_url is not None and "***" not in record.storage_url:
            return record.storage_url
        return None

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run jobs until cancelled; then every job task has ended (each records how)."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            self._intake_open = True
            self._metrics.ready.set(1)
            tg.start_soon(self._ticker, name="vdistream job progress")
            task_status.started()
            try:
                await anyio.sleep_forever()
            finally:
                self._intake_open = False
                self._metrics.ready.set(0)

    def update_settings(self, settings: Settings) -> None:
        """Use new settings for jobs that start from now on (running jobs keep theirs)."""
        self._settings = settings
        self._start_ready()

    def close_intake(self) -> None:
        """Refuse new jobs from now on (``ShuttingDownError``); idempotent."""
        self._intake_open = False
        self._closing = True
        self._metrics.ready.set(0)

    async def abort_all(self, reason: str, *, cause: AbortCause = AbortCause.SHUTDOWN) -> None:
        """Abort every queued and running job (``abort``'s path), recorded as ``cause``."""
        for active in list(self._queued):
            await self._abort_queued(active, reason, cause)
        for active in list(self._running.values()):
            self._request_abort(active, reason, cause)

    def cancel_all(self, reason: str) -> None:
        """Cancel every running job at once (its coordinator still cleans up, shielded
        and bounded by its drain timeout); for a forced shutdown."""
        for active in list(self._running.values()):
            if active.abort_reason is None:
                active.abort_reason = reason
                active.abort_cause = AbortCause.SHUTDOWN
            if active.scope is not None:
                active.scope.cancel()

    async def wait_idle(self) -> None:
        """Return once no job is queued or running."""
        while self._live:
            await self._wait_change()

    async def _wait_change(self) -> None:
        await self._change.wait()

    def _notify(self) -> None:
        self._change.set()
        self._change = anyio.Event()
        self._metrics.jobs_current.labels("queued").set(len(self._queued))
        self._metrics.jobs_current.labels("running").set(len(self._running))

    # --- submitting -------------------------------------------------------------------

    def _resolve(self, request: JobRequest) -> tuple[JobRequest, DatabaseSettings]:
        databases = self._settings.databases
        if not request.database:
            match = self._match_source(request)
            return dataclasses.replace(request, database=match.name), match
        database = databases.get(request.database)
        if database is None:
            known = ", ".join(sorted(databases)) or "none"
            raise UnknownDatabaseError(
                f"no database {request.database!r} in the settings (configured: {known})"
            )
        return request, database

    def _match_source(self, request: JobRequest) -> DatabaseSettings:
        source, destination = request.source or "", request.destination or ""
        for database in self._settings.databases.values():
            dest = self._settings.destinations[database.destination]
            if _same_url(database.url, source) and (
                destination == dest.name or _same_url(dest.url, destination)
            ):
                return database
        raise UnknownDatabaseError(
            f"no configured database backs up {source!r} into {destination!r}: the daemon "
            "runs only the databases of its settings (add a [databases.NAME] table, or run "
            "the backup without the daemon)"
        )

    def _slot_free(self, database: DatabaseSettings) -> bool:
        """Whether a job of ``database`` submitted now would start without waiting."""
        pending = [a for a in self._queued if not a.stored]
        running = len(self._running) + len(pending)
        mine = sum(1 for a in self._running.values() if a.database == database.name)
        mine += sum(1 for a in pending if a.database == database.name)
        waiting = any(a.stored and a.database == database.name for a in self._queued)
        return (
            running < self._settings.service.max_jobs and mine < database.max_jobs and not waiting
        )

    async def submit(self, request: JobRequest, *, internal: bool = False) -> JobRecord:
        """Accept a job: ``ShuttingDownError``, ``UnknownDatabaseError``,
        ``QueueFullError`` (module doc) or the job as stored (``queued``)."""
        if not self._intake_open:
            raise ShuttingDownError("the daemon is shutting down: it accepts no new jobs")
        request, database = self._resolve(request)
        service = self._settings.service
        if not internal:
            live_limit = service.max_jobs + service.max_queued
            blocked = sum(1 for a in self._queued if a.stored)
            if len(self._live) >= live_limit or (
                not self._slot_free(database) and blocked >= service.max_queued
            ):
                raise QueueFullError(
                    f"no room for another job: {len(self._running)} running "
                    f"(service.max_jobs = {service.max_jobs}, databases.{database.name}."
                    f"max_jobs = {database.max_jobs}) and {blocked} queued "
                    f"(service.max_queued = {service.max_queued}); try again later"
                )
        params = request.params()
        params["destination"] = database.destination
        record = JobRecord.new(request.kind, database.name, params=params)
        active = _Active(request, record, anyio.Event())
        self._queued.append(active)
        self._live[record.id] = active
        try:
            with anyio.CancelScope(shield=True):
                active.record = await self._store.add(record)
        except BaseException:
            self._queued.remove(active)
            del self._live[record.id]
            self._notify()
            raise
        active.stored = True
        log.info(
            "job_submitted",
            job_id=record.id,
            kind=request.kind.value,
            database=database.name,
            trigger=request.trigger,
        )
        if active.abort_reason is not None:
            await self._abort_queued(active, active.abort_reason, active.abort_cause)
        else:
            self._start_ready()
        self._notify()
        return active.record

    def _start_ready(self) -> None:
        if self._tg is None or self._closing:
            return
        limit = self._settings.service.max_jobs
        for active in list(self._queued):
            if len(self._running) >= limit:
                break
            if not active.stored or active.abort_reason is not None:
                continue
            database = self._settings.databases.get(active.database)
            per_database = database.max_jobs if database is not None else 1
            busy = sum(1 for a in self._running.values() if a.database == active.database)
            if busy >= per_database:
                continue
            self._queued.remove(active)
            self._running[active.id] = active
            self._tg.start_soon(self._run_job, active, name=f"vdistream job {active.id}")
        self._notify()

    # --- aborting ---------------------------------------------------------------------

    async def abort(self, job_id: str, reason: str = "requested by the user") -> JobRecord:
        """Abort a job (module doc): ``UnknownJobError``, ``JobFinishedError``, or the
        job as it is now (a running job ends ``aborted`` shortly after)."""
        active = self._live.get(job_id)
        if active is None:
            try:
                record = await self._store.get(job_id)
            except JobNotFoundError:
                raise UnknownJobError(f"no job {job_id!r}") from None
            raise JobFinishedError(
                f"job {job_id} already ended ({record.state.value}); there is nothing to abort"
            )
        log.info("job_abort_requested", job_id=job_id, reason=reason)
        if active in self._queued:
            if not active.stored:
                active.abort_reason = reason  # submit() ends it once it is stored
                return active.record
            await self._abort_queued(active, reason)
            return active.record
        self._request_abort(active, reason)
        return active.record

    async def _abort_queued(
        self, active: _Active, reason: str, cause: AbortCause = AbortCause.USER
    ) -> None:
        if active not in self._queued:
            return
        self._queued.remove(active)
        active.abort_reason = reason
        active.abort_cause = cause
        outcome = _Outcome(JobState.ABORTED, error=reason, cause=cause.value)
        await self._finish(active, outcome)

    def _request_abort(
        self, active: _Active, reason: str, cause: AbortCause = AbortCause.USER
    ) -> None:
        if active.abort_reason is None:
            active.abort_reason = reason
            active.abort_cause = cause
            active.abort_at = anyio.current_time()
        job = active.coordinator
        if job is not None and job.status in _MOVING:
            job.abort(reason, cause=cause)
        elif job is None or job.status is JobStatus.PENDING:
            if active.scope is not None:
                active.scope.cancel()
            # else: _run_job cancels its scope as soon as it enters it
        else:
            log.info("job_abort_too_late", job_id=active.id, status=job.status.value)

    # --- running ----------------------------------------------------------------------

    async def _run_job(self, active: _Active) -> None:
        outcome: _Outcome | None = None
        with structlog.contextvars.bound_contextvars(job_id=active.id, database=active.database):
            try:
                with anyio.CancelScope() as scope:
                    active.scope = scope
                    if active.abort_reason is not None:
                        scope.cancel()
                    outcome = await self._execute(active)
            except Exception as exc:  # a bug, or an error nobody translated: recorded
                log.exception("job_crashed", error=repr(exc))
                outcome = _Outcome(JobState.FAILED, error=f"internal error: {exc!r}")
            finally:
                if outcome is None:  # cancelled: by abort(), or a forced shutdown
                    reason = active.abort_reason or "cancelled: the daemon stopped"
                    cause = active.abort_cause if active.abort_reason else AbortCause.CANCELLED
                    outcome = _Outcome(JobState.ABORTED, error=reason, cause=cause.value)
                await self._finish(active, outcome)
            await self._follow_up(active, outcome)

    async def _execute(self, active: _Active) -> _Outcome:
        try:
            database = self._settings.databases.get(active.database)
            if database is None:
                raise UnknownDatabaseError(
                    f"database {active.database!r} was removed from the settings "
                    "while the job was queued"
                )
            destination = self._settings.destinations[database.destination]
            kind = active.request.kind
            if kind is JobType.BACKUP:
                return await self._backup(active, database, destination)
            if kind is JobType.RESTORE:
                return await self._restore(active, database, destination)
            return await self._verify(active, database, destination)
        except (VdistreamError, OSError) as exc:
            return _Outcome(JobState.FAILED, error=str(exc), refused=_refusal(exc))

    async def _started(self, active: _Active, **fields: Any) -> None:
        active.started_at = anyio.current_time()
        active.record = await self._store.update(active.id, state=JobState.RUNNING, **fields)
        log.info("job_running", kind=active.record.kind.value, backup_id=active.record.backup_id)
        self._notify()

    def _hook(self, active: _Active) -> Any:
        def attach(job: Job) -> None:
            active.coordinator = job

        return attach

    async def _backup(
        self, active: _Active, database: DatabaseSettings, destination: DestinationSettings
    ) -> _Outcome:
        request = active.request
        backup_id = request.backup_id or new_backup_id(database.name)
        keys = [stream_key(backup_id, i, database.devices) for i in range(database.devices)]
        await self._started(
            active,
            backup_id=backup_id,
            storage_url=destination.display_url,
            add_storage_keys=keys,
        )
        settings = BackupSettings(
            devices=database.devices,
            mode=database.mode,
            backup_id=backup_id,
            compression=database.compress if database.compress.enabled else None,
            encryption=_keys(database),
            workdir=self._settings.service.work_dir,
        )
        outcome = await run_backup(
            database.url, destination.url, settings, on_job=self._hook(active)
        )
        result = {**outcome.summary(), "destination": destination.name}
        job = outcome.result
        cause = job.aborted_by.value if job.aborted_by is not None else None
        if outcome.ok:
            return _Outcome(JobState.SUCCEEDED, result)
        state = JobState.ABORTED if job.status is JobStatus.ABORTED else JobState.FAILED
        return _Outcome(state, result, str(job.error), cause)

    async def _pick_backup(
        self, database: DatabaseSettings, destination: DestinationSettings, wanted: str | None
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

    async def _restore(
        self, active: _Active, database: DatabaseSettings, destination: DestinationSettings
    ) -> _Outcome:
        request = active.request
        backup_id = await self._pick_backup(database, destination, request.backup_id)
        await self._started(active, backup_id=backup_id, storage_url=destination.display_url)
        assert request.target is not None
        result = await run_restore(
            _backup_ref(destination.url, backup_id),
            request.target,
            overwrite=request.overwrite,
            create=request.create,
            owner=request.owner,
            keys=_keys(database),
            on_job=self._hook(active),
        )
        summary = {
            "id": backup_id,
            "status": result.status.value,
            "target": request.target,
            "bytes": result.bytes,
            "seconds": round(result.duration, 3),
            "error": None if result.ok else str(result.error),
            "aborted_by": result.aborted_by.value if result.aborted_by else None,
        }
        if result.ok:
            return _Outcome(JobState.SUCCEEDED, summary)
        state = JobState.ABORTED if result.status is JobStatus.ABORTED else JobState.FAILED
        cause = result.aborted_by.value if result.aborted_by is not None else None
        refused = _refusal(result.error) if state is JobState.FAILED else None
        if refused is not None:
            cause = None  # the engine refused to start: not an abort
        return _Outcome(state, summary, str(result.error), cause, refused)

    async def _verify(
        self, active: _Active, database: DatabaseSettings, destination: DestinationSettings
    ) -> _Outcome:
        request = active.request
        backup_id = await self._pick_backup(database, destination, request.backup_id)
        await self._started(active, backup_id=backup_id, storage_url=destination.display_url)
        report = await run_verify(
            _backup_ref(destination.url, backup_id),
            content=request.content,
            keys=_keys(database),
            workdir=self._settings.service.work_dir,
        )
        result: dict[str, Any] = report.summary()
        if not report.ok:
            bad = next((c for c in report.checks if not c.ok), None)
            error = f"{bad.name}: {bad.detail}" if bad is not None else "nothing was checked"
            return _Outcome(
                JobState.FAILED, result, f"backup {backup_id} failed to verify: {error}"
            )
        if group_of(backup_id) != database.name:
            # A backup made by hand in the destination: verified, but it is not one of
            # the database's own, so neither the gauge nor retention counts it.
            result["recorded"] = False
            return _Outcome(JobState.SUCCEEDED, result)
        async with open_storage(destination.url) as storage:
            manifest = await read_manifest(storage, backup_id)
            await self._store.record_verified(
                database.name, backup_id, backup_ended=backup_ended(manifest), job_id=active.id
            )
            if database.retention.enabled:
                result["retention"] = await self._retention(active, storage, database, backup_id)
        return _Outcome(JobState.SUCCEEDED, result)

    async def _retention(
        self, active: _Active, storage: Any, database: DatabaseSettings, backup_id: str
    ) -> dict[str, Any]:
        manifests, problems = await list_manifests(storage)
        present = [m.backup_id for m in manifests if group_of(m.backup_id) == database.name]
        verified = await verified_ids(self._store, database.name, present)
        verified.add(backup_id)  # this job: still "running" in the store
        in_use = {
            a.record.backup_id or a.request.backup_id
            for a in self._live.values()
            if a is not active and a.database == database.name
        }
        outcome = await apply_retention(
            storage,
            manifests,
            database.name,
            database.retention,
            verified,
            in_use={b for b in in_use if b},
        )
        deleted = [d for d in outcome.deleted if d.error is None]
        if deleted:
            self._metrics.retention_deleted.labels(database.name).inc(len(deleted))
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

    async def _finish(self, active: _Active, outcome: _Outcome) -> None:
        """Record the end of a job (shielded, bounded), update the metrics, free its
        slot and start what can start."""
        if active.finished:
            return
        active.finished = True
        self._sample(active)
        record = active.record
        with anyio.CancelScope(shield=True), anyio.move_on_after(_STORE_TIMEOUT):
            try:
                fields: dict[str, Any] = {"result": outcome.result, "error": outcome.error}
                if active.live is not None:
                    fields["progress"] = active.live
                record = await self._store.update(active.id, state=outcome.state, **fields)
            except StateError as exc:
                log.error("job_record_failed", job_id=active.id, error=str(exc))
        active.record = record
        kind = active.request.kind.value
        self._metrics.jobs.labels(kind, outcome.state.value).inc()
        if active.started_at is not None:
            self._metrics.job_duration.labels(kind).observe(
                anyio.current_time() - active.started_at
            )
        if outcome.refused is not None:
            self._metrics.refused.labels(kind, outcome.refused).inc()
        elif outcome.state is not JobState.SUCCEEDED and outcome.cause is not None:
            self._metrics.aborts.labels(kind, outcome.cause).inc()
        log.log(
            20 if outcome.state is JobState.SUCCEEDED else 30,
            "job_ended",
            job_id=active.id,
            state=outcome.state.value,
            error=outcome.error,
        )
        self._running.pop(active.id, None)
        self._live.pop(active.id, None)
        active.done.set()
        self._start_ready()
        self._notify()

    async def _follow_up(self, active: _Active, outcome: _Outcome) -> None:
        request = active.request
        if (
            request.kind is not JobType.BACKUP
            or outcome.state is not JobState.SUCCEEDED
            or not self._intake_open
        ):
            return
        database = self._settings.databases.get(active.database)
        wanted = request.verify
        if wanted is None:
            wanted = database.verify_after_backup if database is not None else False
        if not wanted or active.record.backup_id is None:
            return
        try:
            await self.submit(
                JobRequest(
                    JobType.VERIFY,
                    active.database,
                    backup_id=active.record.backup_id,
                    trigger="after-backup",
                    after=active.id,
                ),
                internal=True,
            )
        except ServiceError as exc:
            log.error("verify_not_queued", job_id=active.id, error=str(exc))

    # --- progress ---------------------------------------------------------------------

    def _sample(self, active: _Active) -> dict[str, Any] | None:
        """Take the coordinator job's progress into ``active.live`` and the metrics."""
        job = active.coordinator
        if job is None:
            return active.live
        snap = job.progress.snapshot()
        devices = []
        for index, device in enumerate(snap.devices):
            devices.append(
                {
                    "index": index,
                    "name": device.name,
                    "bytes": device.bytes,
                    "commands": device.commands,
                    "rate": round(device.rate, 1),
                }
            )
            seen_bytes, seen_commands = active.counted.get(index, (0, 0))
            if device.bytes > seen_bytes:
                self._metrics.device_bytes.labels(active.database, str(index)).inc(
                    device.bytes - seen_bytes
                )
            if device.commands > seen_commands:
                self._metrics.device_commands.labels(active.database, str(index)).inc(
                    device.commands - seen_commands
                )
            active.counted[index] = (
                max(device.bytes, seen_bytes),
                max(device.commands, seen_commands),
            )
        active.live = {
            "kind": job.kind.value,
            "status": job.status.value,
            "bytes": snap.bytes,
            "rate": round(snap.rate, 1),
            "elapsed": round(snap.elapsed, 3),
            "devices": devices,
        }
        return active.live

    async def _ticker(self) -> None:
        since_persist = 0.0
        since_prune = 0.0
        while True:
            await anyio.sleep(self._tick_interval)
            since_persist += self._tick_interval
            since_prune += self._tick_interval
            if since_prune >= _PRUNE_EVERY:
                since_prune = 0.0
                await self._prune_history()
            rates: dict[str, float] = defaultdict(float)
            buffers: dict[str, int] = defaultdict(int)
            now = anyio.current_time()
            for active in list(self._running.values()):
                live = self._sample(active)
                job = active.coordinator
                if live is not None and job is not None and job.status in _MOVING:
                    rates[active.database] += live["rate"]
                    buffers[active.database] += _buffers_in_use(job)
                if (
                    active.abort_at is not None
                    and now - active.abort_at > self._abort_fallback
                    and active.scope is not None
                    and not active.scope.cancel_called
                ):
                    log.warning("job_abort_forced", job_id=active.id)
                    active.scope.cancel()
            for name in set(self._settings.databases) | set(rates):
                self._metrics.throughput.labels(name).set(rates.get(name, 0.0))
                self._metrics.buffers_in_use.labels(name).set(buffers.get(name, 0))
            if since_persist >= self._persist_every:
                since_persist = 0.0
                for active in list(self._running.values()):
                    if active.finished or active.live is None:
                        continue
                    with anyio.move_on_after(_STORE_TIMEOUT):
                        try:
                            await self._store.update(active.id, progress=active.live)
                        except StateError as exc:
                            log.warning("progress_not_recorded", job_id=active.id, error=str(exc))

    # --- reading ----------------------------------------------------------------------

    def _position(self, active: _Active) -> int | None:
        try:
            return self._queued.index(active)
        except ValueError:
            return None

    def _view(self, active: _Active) -> dict[str, Any]:
        live = self._sample(active) if active.id in self._running else None
        return job_view(active.record, live, queue_position=self._position(active))

    async def view(self, job_id: str) -> dict[str, Any]:
        """The job's JSON form (``jobs.job_view``), live when it is queued or running."""
        active = self._live.get(job_id)
        if active is not None and active.stored:
            return self._view(active)
        try:
            return job_view(await self._store.get(job_id))
        except JobNotFoundError:
            raise UnknownJobError(f"no job {job_id!r}") from None

    async def views(
        self,
        *,
        state: list[JobState] | None = None,
        database: str | None = None,
        kind: JobType | None = None,
        limit: int | None = 100,
    ) -> list[dict[str, Any]]:
        """Jobs newest first, filtered, as JSON forms (live ones with live progress)."""
        records = await self._store.list(limit, state=state, database=database, kind=kind)
        out = []
        for record in records:
            active = self._live.get(record.id)
            if active is not None and active.stored:
                view = self._view(active)
                if state is None or JobState(view["state"]) in state:
                    out.append(view)
            else:
                out.append(job_view(record))
        return out

    async def watch(self, job_id: str, interval: float = 1.0) -> AsyncIterator[dict[str, Any]]:
        """The job's JSON form now, then every ``interval`` seconds and at every change
        of state, ending with its final form."""
        view = await self.view(job_id)
        yield view
        while not JobState(view["state"]).terminal:
            active = self._live.get(job_id)
            if active is not None:
                change = self._change
                with anyio.move_on_after(interval):
                    await change.wait()
            view = await self.view(job_id)
            yield view

    def live_jobs(self) -> list[str]:
        """Ids of the jobs queued or running, oldest first."""
        return list(self._live)


def _empty_dir(path: Path) -> None:
    """Create ``path`` (mode 0700) or remove everything in it."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    for entry in path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _remove_partial_target(target: object) -> list[str]:
    """The temporary files a restore into the file ``target`` writes before it puts
    the result in place (named by ``engines.files`` and ``engines.streams``); never
    ``target`` itself."""
    if not isinstance(target, str) or "://" in target or ":" in target.split("/", 1)[0]:
        return []  # a database URL or a command: nothing of ours on disk
    path = Path(target)
    # A partial file beside the target may be a live restore's (a CLI's, say): only
    # those whose lock nobody holds go. The dump-to-file ``.partial`` is the daemon's.
    removed = [str(p) for p in remove_stale_partials(path)]
    try:
        partial_path(path).unlink()
    except OSError:
        return removed
    return [*removed, str(partial_path(path))]


def _keys(database: DatabaseSettings) -> KeySource | None:
    """The database's key source; the key itself is read per job, never kept. It is
    optional: the database's older, unencrypted backups still restore and verify."""
    if database.encrypt_key_file is None:
        return None
    return KeySource(key_file=str(database.encrypt_key_file), optional=True)


def _backup_ref(url: str, backup_id: str) -> str:
    return f"{url.rstrip('/')}/{backup_id}"


def _same_url(configured: str, given: str) -> bool:
    """Whether a client's URL or path names the same thing as a configured one."""

    def normal(text: str) -> str:
        text = text.strip()
        if text.startswith("file://"):
            text = text[len("file://") :]
        if text.startswith("sqlite:") and not text.startswith("sqlite://"):
            text = "sqlite://" + text[len("sqlite:") :]
        return text.rstrip("/") or "/"

    return normal(configured) == normal(given)


def _buffers_in_use(job: Job) -> int:
    """Buffers of the job's buffer area that devices hold now (0 when unknown).

    The coordinator does not publish this; it is read from its client set's buffer
    area, defensively, since those are internals.
    """
    core = getattr(getattr(job, "_vds", None), "_core", None)
    in_use = getattr(getattr(core, "area", None), "in_use", None)
    if not callable(in_use):
        return 0
    try:
        return len(in_use())
    except (AttributeError, TypeError, ValueError):
        return 0
