"""The job manager: accepts, starts, aborts and records jobs, composing its parts.

``JobManager(store, settings, metrics)`` runs backup, restore and verify jobs inside
its own task group (``await tg.start(manager.run)``); every job is one task of that
group, and the group outlives them all. Its parts, one job each: ``admission`` (the
queue and the limits), ``runners`` (one job's run to its ``Outcome``, and its abort),
``recovery`` (what a previous run left; forgetting old jobs) and ``progress``.

* ``close_intake()`` (shutdown) refuses every new request with ``ShuttingDownError``.
* A job is stored (``JobStore``) when accepted (``queued``), when it starts
  (``running``), every ``persist_every`` seconds with its per-device progress, and
  when it ends (``succeeded``, ``failed`` or ``aborted``, with its result and error).
  The final write is shielded, so a job cancelled by a forced shutdown is recorded.
* ``abort(job_id, reason)``: a queued job ends ``aborted`` at once; a running one gets
  ``LiveJob.request_abort`` (``runners`` module doc), which ends it ``aborted`` with
  nothing of it left in storage.
* A backup that succeeded is followed by a verification of it (request ``verify``,
  default the database's ``verify_after_backup``), which also applies the database's
  retention (``runners`` module doc).
* A SQL Server backup's end is also counted by its mode:
  ``vdistream_sqlserver_backups_total{database, mode, outcome}`` (``mode`` ``full``,
  ``diff``, ``log``, ``copy-only``; ``outcome`` the job's state), registered with the
  service's other metrics when the manager is made; its job record's ``params`` and
  ``result`` say the mode too.
* Bandwidth (``vdistream.throttle``): one global limit, ``service.max_rate``, for all
  running jobs together (a reload sets it anew; ``throttle_global(rate)`` changes it
  until the next reload), and each job's own limit, its database's ``max_rate`` when
  the job is accepted, that ``throttle(job_id, rate)`` changes while the job is queued
  or running (within a second: at once for a device already waiting). The job's
  devices share both, first come, first served; a job view says its limit
  (``max_rate``, bytes per second or ``None``). Both reach the job's coordinator through
  ``throttle.sharing``, set in the job's own task.
* ``on_event(record, outcome)`` is called at every job's end (the webhooks,
  ``vdistream.service.notify``); it must not block, and its errors are logged.
"""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import anyio
import anyio.abc
import structlog
from prometheus_client import CollectorRegistry, Counter

from vdistream.coordinator import AbortCause
from vdistream.log import get_logger
from vdistream.service.admission import Admission
from vdistream.service.jobs import (
    JobFinishedError,
    JobRequest,
    ServiceError,
    ShuttingDownError,
    UnknownJobError,
    job_view,
)
from vdistream.service.metrics import Metrics
from vdistream.service.progress import ProgressTicker
from vdistream.service.recovery import prune_history, recover
from vdistream.service.runners import JobRunner, LiveJob, Outcome
from vdistream.service.settings import Settings
from vdistream.service.state import (
    WRITE_TIMEOUT,
    JobNotFoundError,
    JobRecord,
    JobState,
    JobStore,
    JobType,
    StateError,
)
from vdistream.storage.s3 import observe_retries
from vdistream.throttle import RateLimit, sharing

__all__ = ("JobManager",)

log = get_logger(__name__)

#: how often ended jobs older than ``service.job_history`` are forgotten (seconds)
_PRUNE_EVERY = 3600.0

#: One counter per registry: a service run again (``async with`` twice) makes a new
#: manager over the same metrics, and a registry refuses a name twice.
_BY_MODE: weakref.WeakKeyDictionary[CollectorRegistry, Counter] = weakref.WeakKeyDictionary()


def _sqlserver_backups(registry: CollectorRegistry) -> Counter:
    """``vdistream_sqlserver_backups_total{database, mode, outcome}`` (module doc)."""
    counter = _BY_MODE.get(registry)
    if counter is None:
        counter = _BY_MODE[registry] = Counter(
            "vdistream_sqlserver_backups",
            "SQL Server backups that ended, by database, mode (full, diff, log, copy-only) "
            "and outcome (succeeded, failed, aborted)",
            ("database", "mode", "outcome"),
            registry=registry,
        )
    return counter


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
        on_event: Callable[[JobRecord, Outcome], None] | None = None,
    ) -> None:
        self._store = store
        self._settings = settings
        self._metrics = metrics
        #: told of every job's end (its final record and outcome): the webhooks
        #: (``vdistream.service.notify``); must not block, its errors are logged
        self._on_event = on_event
        #: all running jobs together (module doc)
        self._global = RateLimit(settings.service.max_rate, name="global")
        #: each live job's own limit, by job id (module doc)
        self._rates: dict[str, RateLimit] = {}
        self._jobs = Admission()
        self._runner = JobRunner(
            store=store, metrics=metrics, changed=self._notify, in_use=self._jobs.backups_in_use
        )
        self._ticker = ProgressTicker(store, metrics, tick, persist_every, abort_fallback)
        self._by_mode = _sqlserver_backups(metrics.registry)
        self._tg: anyio.abc.TaskGroup | None = None
        self._intake_open = False
        #: set by close_intake only: queued jobs then stay queued. A manager cancelled
        #: without it (a failed start) still starts them, to record them aborted.
        self._closing = False
        self._change = anyio.Event()
        self._started_at = datetime.now(UTC)

    @property
    def settings(self) -> Settings:
        return self._settings

    @property
    def accepting(self) -> bool:
        """Whether new jobs are accepted (the manager runs and intake is open)."""
        return self._intake_open

    @property
    def counts(self) -> dict[str, int]:
        return self._jobs.counts

    # --- lifecycle --------------------------------------------------------------------

    async def recover(self) -> list[JobRecord]:
        """``recovery.recover``: call once, before ``run``."""
        return await recover(self._store, self._settings, self._started_at)

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run jobs until cancelled; then every job task has ended (each records how)."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            self._intake_open = True
            self._metrics.ready.set(1)
            tg.start_soon(
                self._ticker.run,
                self._jobs.running,
                lambda: self._settings.databases,
                name="vdistream job progress",
            )
            tg.start_soon(self._prune_hourly, name="vdistream job history")
            task_status.started()
            try:
                await anyio.sleep_forever()
            finally:
                self._intake_open = False
                self._metrics.ready.set(0)

    async def _prune_hourly(self) -> None:
        while True:
            await anyio.sleep(_PRUNE_EVERY)
            await prune_history(self._store, self._settings)

    def update_settings(self, settings: Settings) -> None:
        """Use new settings for jobs that start from now on (running jobs keep theirs,
        but for the global bandwidth limit, which applies at once)."""
        self._settings = settings
        self._global.set_rate(settings.service.max_rate)
        self._start_ready()

    def close_intake(self) -> None:
        """Refuse new jobs from now on (``ShuttingDownError``); idempotent."""
        self._intake_open = False
        self._closing = True
        self._metrics.ready.set(0)

    async def abort_all(self, reason: str, *, cause: AbortCause = AbortCause.SHUTDOWN) -> None:
        """Abort every queued and running job (``abort``'s path), recorded as ``cause``."""
        for job in self._jobs.queued():
            await self._abort_queued(job, reason, cause)
        for job in self._jobs.running():
            job.request_abort(reason, cause)

    def cancel_all(self, reason: str) -> None:
        """Cancel every running job at once (its coordinator still cleans up, shielded
        and bounded by its drain timeout); for a forced shutdown."""
        for job in self._jobs.running():
            job.cancel(reason)

    async def wait_idle(self) -> None:
        """Return once no job is queued or running."""
        while self._jobs.ids():
            await self._change.wait()

    def _notify(self) -> None:
        self._change.set()
        self._change = anyio.Event()
        for state, count in self._jobs.counts.items():
            self._metrics.jobs_current.labels(state).set(count)

    # --- submitting -------------------------------------------------------------------

    async def submit(self, request: JobRequest, *, internal: bool = False) -> JobRecord:
        """Accept a job: ``ShuttingDownError``, ``UnknownDatabaseError``,
        ``QueueFullError`` (``admission`` module doc) or the job as stored
        (``queued``). ``internal``: the verification after a backup, never refused."""
        if not self._intake_open:
            raise ShuttingDownError("the daemon is shutting down: it accepts no new jobs")
        request, database = self._jobs.resolve(self._settings, request)
        job = self._jobs.admit(self._settings, request, database, internal=internal)
        self._rates[job.id] = RateLimit(database.max_rate, name="job")
        try:
            with anyio.CancelScope(shield=True):
                job.record = await self._store.add(job.record)
        except BaseException:
            self._jobs.release(job)
            self._rates.pop(job.id, None)
            self._notify()
            raise
        job.stored = True
        log.info(
            "job_submitted",
            job_id=job.id,
            kind=request.kind.value,
            database=database.name,
            trigger=request.trigger,
        )
        if job.abort_reason is not None:
            await self._abort_queued(job, job.abort_reason, job.abort_cause)
        else:
            self._start_ready()
        self._notify()
        return job.record

    def _start_ready(self) -> None:
        if self._tg is None or self._closing:
            return  # not running yet, or shutting down: queued jobs stay queued
        for job in self._jobs.startable(self._settings):
            self._tg.start_soon(self._run_job, job, name=f"vdistream job {job.id}")
        self._notify()

    # --- aborting ---------------------------------------------------------------------

    async def abort(self, job_id: str, reason: str = "requested by the user") -> JobRecord:
        """Abort a job (module doc): ``UnknownJobError``, ``JobFinishedError``, or the
        job as it is now (a running job ends ``aborted`` shortly after)."""
        job = self._jobs.get(job_id)
        if job is None:
            try:
                record = await self._store.get(job_id)
            except JobNotFoundError:
                raise UnknownJobError(f"no job {job_id!r}") from None
            raise JobFinishedError(
                f"job {job_id} already ended ({record.state.value}); there is nothing to abort"
            )
        log.info("job_abort_requested", job_id=job_id, reason=reason)
        if self._jobs.position(job) is None:
            job.request_abort(reason)
        elif not job.stored:
            job.abort_reason = reason  # submit() ends it once it is stored
        else:
            await self._abort_queued(job, reason)
        return job.record

    async def _abort_queued(
        self, job: LiveJob, reason: str, cause: AbortCause = AbortCause.USER
    ) -> None:
        if self._jobs.dequeue(job):
            await self._finish(job, job.abort_queued(reason, cause))

    # --- bandwidth ---------------------------------------------------------------------

    @property
    def global_rate(self) -> int | None:
        """The global limit now, bytes per second (``None``: none)."""
        return self._global.rate

    def throttle_global(self, rate: int | None) -> None:
        """Set the global limit (``None``: none) until the next reload (module doc)."""
        log.info("throttle_changed", scope="global", max_rate=rate)
        self._global.set_rate(rate)

    async def throttle(self, job_id: str, rate: int | None) -> dict[str, Any]:
        """Set a queued or running job's own limit (``None``: none): ``UnknownJobError``,
        ``JobFinishedError``, or the job's view with its new limit."""
        job = self._jobs.get(job_id)
        limit = self._rates.get(job_id)
        if job is None or limit is None or job.finished:
            try:
                record = await self._store.get(job_id)
            except JobNotFoundError:
                raise UnknownJobError(f"no job {job_id!r}") from None
            raise JobFinishedError(
                f"job {job_id} already ended ({record.state.value}); its bandwidth limit "
                "cannot change"
            )
        log.info("throttle_changed", scope="job", job_id=job_id, max_rate=rate)
        limit.set_rate(rate)
        return await self.view(job_id)

    # --- running ----------------------------------------------------------------------

    async def _run_job(self, job: LiveJob) -> None:
        outcome: Outcome | None = None
        # The hook is set here, in the job's own task: a task starts with the context
        # of whoever started it (an API request, the host), not the manager's.
        with (
            structlog.contextvars.bound_contextvars(job_id=job.id, database=job.database),
            observe_retries(self._metrics.count_retry),
            sharing(self._rates.setdefault(job.id, RateLimit(name="job")), self._global),
        ):
            try:
                outcome = await self._runner.run(job, self._settings)
            finally:  # outcome None: cancelled from outside (a forced shutdown)
                outcome = outcome or job.cancelled_outcome()
                await self._finish(job, outcome)
            await self._follow_up(job, outcome)

    async def _finish(self, job: LiveJob, outcome: Outcome) -> None:
        """Record the end of a job (shielded, bounded), update the metrics, free its
        slot and start what can start."""
        if job.finished:
            return
        job.finished = True
        live = job.sample(self._metrics)
        with anyio.CancelScope(shield=True), anyio.move_on_after(WRITE_TIMEOUT):
            try:
                fields: dict[str, Any] = {"result": outcome.result, "error": outcome.error}
                if live is not None:
                    fields["progress"] = live
                job.record = await self._store.update(job.id, state=outcome.state, **fields)
            except StateError as exc:
                log.error("job_record_failed", job_id=job.id, error=str(exc))
        seconds = None if job.started_at is None else anyio.current_time() - job.started_at
        state, kind = outcome.state, job.request.kind.value
        self._metrics.job_ended(kind, state.value, seconds, outcome.refused, outcome.cause)
        if job.request.kind is JobType.BACKUP and job.request.mode is not None:  # SQL Server
            self._by_mode.labels(job.database, job.request.mode, state.value).inc()
        level = 20 if state is JobState.SUCCEEDED else 30
        log.log(level, "job_ended", job_id=job.id, state=state.value, error=outcome.error)
        if self._on_event is not None:
            try:
                self._on_event(job.record, outcome)
            except Exception:  # a notification never fails a job
                log.exception("job_event_hook_failed", job_id=job.id)
        self._jobs.release(job)
        self._rates.pop(job.id, None)
        self._start_ready()
        self._notify()

    async def _follow_up(self, job: LiveJob, outcome: Outcome) -> None:
        """Queue the verification of a backup that succeeded (module doc)."""
        if job.request.kind is not JobType.BACKUP or outcome.state is not JobState.SUCCEEDED:
            return
        database = self._settings.databases.get(job.database)
        default = database is not None and database.verify_after_backup
        wanted = default if job.request.verify is None else job.request.verify
        if not wanted or not self._intake_open or job.record.backup_id is None:
            return
        verify = JobRequest(
            JobType.VERIFY,
            job.database,
            backup_id=job.record.backup_id,
            trigger="after-backup",
            after=job.id,
        )
        try:
            await self.submit(verify, internal=True)
        except ServiceError as exc:
            log.error("verify_not_queued", job_id=job.id, error=str(exc))

    # --- reading ----------------------------------------------------------------------

    def _view(self, record: JobRecord) -> dict[str, Any]:
        """The live form of a job queued or running here, else its stored form."""
        job = self._jobs.get(record.id)
        if job is None or not job.stored:
            return job_view(record)
        live = job.sample(self._metrics) if job in self._jobs.running() else None
        limit = self._rates.get(job.id)
        return job_view(
            job.record,
            live,
            queue_position=self._jobs.position(job),
            max_rate=None if limit is None else limit.rate,
        )

    async def view(self, job_id: str) -> dict[str, Any]:
        """The job's JSON form (``jobs.job_view``), live when it is queued or running."""
        job = self._jobs.get(job_id)
        try:
            record = job.record if job is not None and job.stored else await self._store.get(job_id)
        except JobNotFoundError:
            raise UnknownJobError(f"no job {job_id!r}") from None
        return self._view(record)

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
        views = [self._view(record) for record in records]
        # A live job's state may have moved since the store was read.
        return [view for view in views if state is None or JobState(view["state"]) in state]

    async def watch(self, job_id: str, interval: float = 1.0) -> AsyncIterator[dict[str, Any]]:
        """The job's JSON form now, then every ``interval`` seconds and at every change
        of state, ending with its final form."""
        view = await self.view(job_id)
        yield view
        while not JobState(view["state"]).terminal:
            change = self._change
            with anyio.move_on_after(interval):
                await change.wait()
            view = await self.view(job_id)
            yield view

    def waiting(self, database: str, mode: str | None) -> bool:
        """Whether a backup of ``database`` with ``mode`` is queued and not yet started:
        a schedule firing again adds nothing but another wait to the queue."""
        return any(
            job.request.kind is JobType.BACKUP
            and job.request.database == database
            and job.request.mode == mode
            for job in self._jobs.queued()
        )

    def live_jobs(self) -> list[str]:
        """Ids of the jobs queued or running, oldest first."""
        return self._jobs.ids()
