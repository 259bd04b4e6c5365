"""``Service``: the job manager, the schedules and the control API in the caller's loop.

::

    async with vdistream.service.Service(settings) as service:
        record = await service.submit("backup", "app")
        ...                                   # the host application runs

``async with`` starts everything inside the caller's event loop and returns once the
API listens; leaving the block (normally, by an exception, or because the host
cancelled the task) shuts down cleanly: ``shutdown()``. ``vdistream serve`` is this
plus signal handling and logging configuration; ``Service`` itself installs no signal
handler and configures no logging.

systemd (``notify=``, a ``vdistream.service.sdnotify.SystemdNotifier``; ``vdistream
serve`` passes one when systemd gave ``NOTIFY_SOCKET``, a host only if it wants to):
``STATUS=`` while starting (recovery), ``READY=1`` once the API listens (after the
recovery), ``STATUS=`` with the jobs running and queued every few seconds while it
changes, ``RELOADING=1`` then ``READY=1`` around ``reload()``, and ``STOPPING=1`` when
``shutdown()`` begins. The watchdog pings are the caller's (``vdistream serve`` runs
``run_watchdog`` around the whole service, start-up included). Without ``notify``
nothing is sent.

Starting
--------

1. take the state directory's lock file (``vdistream.lock``; one service per state
   database, ``StateError`` naming the other process otherwise);
   end what the children of a previous run left running: the process groups recorded
   in the ledger ``state_dir/children`` (``vdistream.engines.ledger``; each one ended
   only with a proof that it is one of them, never on a pid alone, logged as
   ``orphan_ended``), then record the children of this run there
   (``observe_children``: the children started by tasks that descend from the
   ``async with`` that starts the service, i.e. every job's);
2. open the state database, mark the jobs a previous run left unfinished as failed
   and remove their partial backups (``JobManager.recover``);
3. start the manager, the webhook notifier (``vdistream.service.notify``), the
   schedules (``Scheduler``, one schedule per database and backup kind: see
   Schedules), the event-loop lag probe and the API (``ApiServer``).

Metrics (``vdistream.service.metrics``): besides what the manager counts, the service
computes at scrape time the last-verified and last-successful backups (from the state
database) and each schedule's next fire; each schedule's interval (the longest gap
between two fires over the next 400 days or 2000 fires) is computed when the
schedules start (start, reload).

Schedules
---------

Every ``schedule`` of a database is one schedule of the ``Scheduler``: ``NAME`` for
``schedule``, ``NAME:diff`` for ``schedule_diff`` and ``NAME:log`` for
``schedule_log`` (SQL Server only). When one fires, a backup of that kind is
submitted like a client's request (``trigger`` ``schedule``; for SQL Server ``mode``
``full``, ``diff`` or ``log``; the other engines' backups have their settings' mode).
Schedules due at the same moment fire in the order full, diff, log (the scheduler
orders those of one instant by name), so a full and a log of one database that fire
together are submitted full first, and the database's ``max_jobs`` (1 by default)
queues the log behind the full, FIFO: the log backup then follows the full one (the
full's verification, queued when the full ends, comes after the log). A refused
submission (a full queue) is logged (``scheduled_backup_refused``) with its kind.
``next_fires()`` gives each database's next fire per kind.

Shutting down (``shutdown()``; ``vdistream serve`` on SIGTERM/SIGINT)
----------------------------------------------------------------------

Ordered and bounded by ``service.grace_period`` (from the moment it starts):

1. intake stops: submissions get ``ShuttingDownError`` (HTTP 503) and readiness is
   false; reading jobs and streaming their progress still work;
2. the schedules stop;
3. queued jobs end ``aborted``; running ones get ``Job.abort`` (``signal_abort``, then
   each device drains and every sink is aborted, nothing partial stays);
4. the service waits for them until the grace period is nearly over (a margin of
   ``min(1 s, grace / 4)`` is kept twice); jobs still running then are cancelled
   (their coordinator still cleans up, shielded, bounded by its drain timeout) and
   the service waits for them until one margin before the deadline;
5. the API stops (requests in flight get ``min(3 s, grace / 8)``) and the socket
   file goes away;
6. the remaining tasks are cancelled, the state database closed, the lock released.

Steps 1 to 5 end within the grace period. A job whose cleanup does not end when
cancelled (a storage call stuck in the kernel, an engine's tool ignoring SIGTERM) can
hold step 6 up to its drain timeout; ``vdistream serve`` does not wait for that: it
leaves at the grace period's end (``serve`` module doc), and the next start marks
such a job failed and removes what it left.

``force_stop()`` (a second signal) cancels every job at once and makes step 4 and 5
short. The task group is shielded from the caller's cancellation, so a host that
cancels the ``async with`` still gets the ordered shutdown above, then its
cancellation continues.

Reloading (``reload(settings)``; ``vdistream serve`` on SIGHUP)
---------------------------------------------------------------

Databases, destinations, schedules, limits, retention and the API token take effect
at once for jobs that start afterwards; running jobs keep what they started with.
``state_dir``, ``socket``, ``socket_mode`` and ``listen`` need a restart: a change is
logged (``reload_needs_restart``) and ignored.

Test knob: ``schedule_speedup`` (``VDISTREAM_SCHEDULE_SPEEDUP`` for ``vdistream
serve``) makes the schedules' clock run that many times faster than real time, so a
``* * * * *`` schedule fires every ``60 / speedup`` seconds. Only for tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any, Self

import anyio
import anyio.abc
import anyio.to_thread
from prometheus_client import CollectorRegistry

from vdistream.engines.ledger import LEDGER_DIR, ChildLedger
from vdistream.engines.process import observe_children, reset_child_observer
from vdistream.log import get_logger
from vdistream.service.api import ApiServer
from vdistream.service.jobs import JobRequest, ServiceError
from vdistream.service.manager import JobManager
from vdistream.service.metrics import Metrics
from vdistream.service.notify import Notifier
from vdistream.service.runners import Outcome
from vdistream.service.schedule import CronExpr, Scheduler, next_fire
from vdistream.service.sdnotify import SystemdNotifier
from vdistream.service.settings import SCHEDULE_KINDS, Settings, settings_summary
from vdistream.service.state import (
    JobRecord,
    JobState,
    JobStore,
    JobType,
    StateError,
)

__all__ = ("LOCK_NAME", "Service")

log = get_logger(__name__)

LOCK_NAME = "vdistream.lock"
#: after force_stop(): how long jobs and the API get before being left behind
_FORCED_WAIT = 3.0
_LAG_INTERVAL = 0.05
#: how often the systemd STATUS= line is refreshed (only sent when it changed)
_STATUS_EVERY = 2.0
#: how far ahead a schedule's interval is looked for (days, fires)
_INTERVAL_DAYS = 400
_INTERVAL_FIRES = 2000


class Service:
    """The daemon's work in the caller's event loop (module doc).

    ``registry``: where the metrics go (default: a new ``CollectorRegistry``, never
    the global one). ``api=False`` runs without the control API (embedding only).
    ``notify``: tell systemd (module doc); ``None``, the default, tells nobody.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        registry: CollectorRegistry | None = None,
        api: bool = True,
        process_metrics: bool = True,
        schedule_speedup: float | None = None,
        tick: float = 1.0,
        notify: SystemdNotifier | None = None,
    ) -> None:
        if schedule_speedup is not None and not schedule_speedup > 0:
            raise ValueError("schedule_speedup must be > 0")
        self._settings = settings
        self.metrics = Metrics(registry, process=process_metrics)
        #: the webhooks (``vdistream.service.notify``): one per Service, restartable
        self.notifier = Notifier(settings, self.metrics.registry)
        self._notify = notify
        #: (database, kind) -> the schedule's interval in seconds (metrics)
        self._intervals: dict[tuple[str, str], float] = {}
        self._use_api = api
        self._speedup = schedule_speedup
        self._tick = tick
        self._stack: contextlib.AsyncExitStack | None = None
        self._store: JobStore | None = None
        self._manager: JobManager | None = None
        self._api: ApiServer | None = None
        self._scheduler_scope: anyio.CancelScope | None = None
        self._scheduler: Scheduler | None = None
        #: the scheduler's schedule names -> (database, backup kind)
        self._schedule_targets: dict[str, tuple[str, str]] = {}
        self._bg_scope: anyio.CancelScope | None = None
        self._bg_tg: anyio.abc.TaskGroup | None = None
        self._shutting_down = False
        self._forced = False
        self._shutdown_complete: anyio.Event | None = None

    # --- what the API and the host see ----------------------------------------------

    @property
    def settings(self) -> Settings:
        return self._settings

    @property
    def manager(self) -> JobManager:
        if self._manager is None:
            raise RuntimeError("the service is not running: use `async with Service(...)`")
        return self._manager

    @property
    def store(self) -> JobStore:
        if self._store is None:
            raise RuntimeError("the service is not running: use `async with Service(...)`")
        return self._store

    @property
    def ready(self) -> bool:
        """Readiness: the state database is open, jobs are accepted, no shutdown."""
        return (
            self._store is not None
            and self._manager is not None
            and self._manager.accepting
            and not self._shutting_down
        )

    @property
    def stopping(self) -> bool:
        return self._shutting_down

    @property
    def forced(self) -> bool:
        """Whether ``force_stop()`` was called."""
        return self._forced

    @property
    def addresses(self) -> list[str]:
        """Where the API listens (``unix:PATH``, ``http://HOST:PORT``)."""
        return list(self._api.addresses) if self._api is not None else []

    def next_fires(self) -> dict[str, dict[str, datetime]]:
        """The next planned backups of each scheduled database, by kind (``full``,
        ``diff``, ``log``; the other engines' one schedule is ``full``):
        ``{"app": {"full": ..., "log": ...}}``."""
        if self._scheduler is None:
            return {}
        fires: dict[str, dict[str, datetime]] = {}
        for name, when in self._scheduler.next_fires().items():
            database, kind = self._schedule_targets[name]
            fires.setdefault(database, {})[kind] = when
        return {
            d: dict(sorted(k.items(), key=lambda i: _KIND_ORDER[i[0]])) for d, k in fires.items()
        }

    async def submit(self, kind: str, database: str, **options: Any) -> JobRecord:
        """Queue a job: ``submit("backup", "app")``, ``submit("verify", "app",
        backup_id="latest")``, ``submit("restore", "app", target="/tmp/x.db")``. The
        options are ``JobRequest``'s. Raises the ``ServiceError`` subclasses of
        ``vdistream.service.jobs`` (queue full, unknown database, shutting down)."""
        options.setdefault("trigger", "embedded")
        return await self.manager.submit(
            JobRequest(kind=JobType(kind), database=database, **options)
        )

    async def jobs(
        self,
        *,
        state: JobState | str | None = None,
        database: str | None = None,
        kind: str | None = None,
        limit: int | None = 100,
    ) -> list[JobRecord]:
        """Jobs newest first, as stored (``JobStore.list``)."""
        return await self.store.list(limit, state=state, database=database, kind=kind)

    async def job(self, job_id: str) -> dict[str, Any]:
        """The job's JSON form with its live per-device progress (``UnknownJobError``)."""
        return await self.manager.view(job_id)

    async def abort(self, job_id: str, reason: str = "requested by the host") -> JobRecord:
        """Abort a job (``JobManager.abort``)."""
        return await self.manager.abort(job_id, reason)

    async def throttle(self, job_id: str, rate: int | None) -> dict[str, Any]:
        """Set a queued or running job's bandwidth limit, bytes per second (``None``:
        none); its view (``JobManager.throttle``: ``UnknownJobError``,
        ``JobFinishedError``)."""
        return await self.manager.throttle(job_id, rate)

    def throttle_global(self, rate: int | None) -> None:
        """Set the global bandwidth limit until the next reload (``JobManager``)."""
        self.manager.throttle_global(rate)

    async def wait(self, job_id: str, *, poll: float = 0.2) -> JobRecord:
        """Wait until the job ended (``UnknownJobError``); its final record."""
        async for _ in self.manager.watch(job_id, poll):
            pass  # the last view is the job's final form, once its end is recorded
        return await self.store.get(job_id)

    async def metrics_text(self) -> bytes:
        """The Prometheus exposition, with the gauges computed at scrape time (module
        doc: Metrics) computed now."""
        if self._store is not None:
            with contextlib.suppress(StateError):
                verified = await self._store.all_verified()
                self.metrics.set_verified(self._settings.databases, verified, datetime.now(UTC))
                self.metrics.set_successes(await self._store.last_successes())
        fires = {
            (database, kind): when
            for database, kinds in self.next_fires().items()
            for kind, when in kinds.items()
        }
        self.metrics.set_schedules(self._intervals, fires)
        return self.metrics.render()

    # --- lifecycle --------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._stack is not None:
            raise RuntimeError("this Service is already running")
        self._shutdown_complete = anyio.Event()
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(self._running())
            self._stack = stack.pop_all()
        return self

    async def __aexit__(self, *exc_info: Any) -> bool:
        stack, self._stack = self._stack, None
        # The host's exception goes through the task group, as it always has: a host
        # error comes out as an ExceptionGroup, a cancellation as itself.
        return stack is not None and bool(await stack.__aexit__(*exc_info))

    @contextlib.asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        """Start (module doc), yield while the host runs, then shut down and release
        everything in reverse order."""
        service = self._settings.service
        self._tell_status("starting: taking the state directory, recovering interrupted jobs")
        self.metrics.set_databases(self._settings.databases)
        try:
            async with contextlib.AsyncExitStack() as stack:
                lock = await anyio.to_thread.run_sync(_lock, service.state_dir / LOCK_NAME)
                stack.callback(_unlock, lock)
                # The lock proves the previous run gone: what its children left is debris.
                ledger = ChildLedger(service.state_dir / LEDGER_DIR)
                await anyio.to_thread.run_sync(ledger.end_survivors)
                stack.callback(reset_child_observer, observe_children(ledger))
                self._store = await stack.enter_async_context(await JobStore.open(service.state_db))
                # Every job's end, whoever records it (recovery included): the
                # per-database metrics of the alert rules.
                self._store.observe_ends(self.metrics.job_recorded)
                self._manager = JobManager(
                    self._store,
                    self._settings,
                    self.metrics,
                    tick=self._tick,
                    on_event=self.notifier.job_event,
                )
                for record in await self._manager.recover():
                    # the previous run never told anyone: its interrupted jobs failed
                    self.notifier.job_event(
                        record,
                        Outcome(
                            record.state,
                            None if record.result is None else dict(record.result),
                            record.error,
                        ),
                    )
                async with anyio.create_task_group() as tg:
                    try:
                        await tg.start(self._background, name="vdistream service")
                        self._start_scheduler()
                        if self._use_api:
                            # Requests in flight (progress streams) get a share of the grace.
                            timeout = min(3.0, max(0.2, service.grace_period / 8))
                            self._api = ApiServer(self, service, shutdown_timeout=timeout)
                            await self._api.start()
                    except BaseException:
                        await self._stop_background()
                        raise
                    log.info("service_started", **_started_fields(self._settings, self.addresses))
                    if self._notify is not None:
                        self._notify.ready(self._status_line())
                    try:
                        yield
                    finally:
                        with anyio.CancelScope(shield=True):
                            await self.shutdown("the service is leaving its `async with` block")
        finally:
            self._store = self._manager = None

    async def _background(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """The service's own tasks, shielded from the host's cancellation: only
        ``shutdown()`` ends them (by cancelling ``_bg_scope``)."""
        assert self._manager is not None
        with anyio.CancelScope(shield=True) as scope:
            self._bg_scope = scope
            async with anyio.create_task_group() as tg:
                self._bg_tg = tg
                await tg.start(self._manager.run)
                await tg.start(self.notifier.run, name="vdistream notifications")
                tg.start_soon(self._lag_probe, name="vdistream event-loop lag")
                if self._notify is not None:
                    tg.start_soon(self._status_updates, name="vdistream systemd status")
                task_status.started()
        self._bg_tg = None

    async def _stop_background(self) -> None:
        """Stop the API (shielded) and end the service's own tasks; idempotent."""
        if self._api is not None:
            await self._api.stop()
        if self._bg_scope is not None:
            self._bg_scope.cancel()

    async def wait_shutdown(self) -> None:
        """Return once ``shutdown()`` has finished (then leave the ``async with``)."""
        if self._shutdown_complete is None:
            raise RuntimeError("the service was never started")
        await self._shutdown_complete.wait()

    async def shutdown(
        self, reason: str = "the service is shutting down", *, grace: float | None = None
    ) -> None:
        """The ordered, bounded shutdown of the module doc. Idempotent: a second call
        waits for the first one to finish."""
        if self._shutdown_complete is None or self._manager is None:
            return
        if self._shutting_down:
            await self._shutdown_complete.wait()
            return
        self._shutting_down = True
        if self._notify is not None:
            self._notify.stopping(f"stopping: {reason}")
        manager = self._manager
        grace = self._settings.service.grace_period if grace is None else grace
        deadline = anyio.current_time() + grace
        # Every step is measured against one deadline; the margin keeps room for the
        # steps after it (cancelled jobs recording their end, the API stopping).
        margin = min(1.0, grace / 4)
        log.info("shutdown_started", reason=reason, grace_period=grace, **manager.counts)
        manager.close_intake()
        self._stop_scheduler()
        await manager.abort_all(reason)
        with anyio.move_on_at(deadline - 2 * margin):
            await manager.wait_idle()
        if manager.live_jobs():
            log.error("shutdown_grace_expired", cancelling=manager.live_jobs(), grace_period=grace)
            manager.cancel_all(f"{reason}: cancelled at the end of the grace period")
            wait = deadline - margin if not self._forced else anyio.current_time() + _FORCED_WAIT
            with anyio.move_on_at(wait):
                await manager.wait_idle()
        await self._stop_background()
        log.info("shutdown_complete", forced=self._forced, stuck=manager.live_jobs())
        self._shutdown_complete.set()

    def force_stop(self, reason: str = "forced shutdown") -> None:
        """Cancel every running job at once (the second signal)."""
        self._forced = True
        if self._manager is not None:
            self._manager.close_intake()
            self._manager.cancel_all(reason)

    async def reload(self, settings: Settings) -> list[str]:
        """Apply new settings (module doc); returns the changes that need a restart."""
        if self._notify is not None:
            self._notify.reloading("reloading the settings")
        old = self._settings.service
        kept = {
            name: getattr(old, name) for name in ("state_dir", "socket", "socket_mode", "listen")
        }
        fixed = [name for name, value in kept.items() if getattr(settings.service, name) != value]
        if fixed:
            log.warning("reload_needs_restart", keys=[f"service.{n}" for n in fixed])
        service = dataclasses.replace(settings.service, **kept)
        self._settings = dataclasses.replace(settings, service=service)
        self.notifier.update_settings(self._settings)
        self.metrics.set_databases(self._settings.databases)
        if self._manager is not None:
            self._manager.update_settings(self._settings)
        if not self._shutting_down:
            self._stop_scheduler()
            self._start_scheduler()
            if self._notify is not None:
                self._notify.ready(self._status_line())
        log.info(
            "settings_reloaded",
            databases=sorted(self._settings.databases),
            schedules={n: c.text for n, (c, _, _) in _schedules(settings).items()},
        )
        return [f"service.{n}" for n in fixed]

    # --- schedules --------------------------------------------------------------------

    def _start_scheduler(self) -> None:
        found = _schedules(self._settings)
        tz = self._settings.service.tzinfo()
        now = datetime.now(UTC)
        self._intervals = {
            (database, kind): _interval(cron, tz, now) for cron, database, kind in found.values()
        }
        if not found or self._bg_tg is None:
            return
        schedules = {name: cron for name, (cron, _, _) in found.items()}
        self._schedule_targets = {name: (db, kind) for name, (_, db, kind) in found.items()}
        clock, sleep = _clock_and_sleep(self._speedup)
        scheduler = Scheduler(
            schedules,
            self._on_schedule,
            tz=self._settings.service.tzinfo(),
            clock=clock,
            sleep=sleep,
        )
        scope = anyio.CancelScope()
        self._scheduler, self._scheduler_scope = scheduler, scope
        self._bg_tg.start_soon(self._run_scheduler, scheduler, scope, name="vdistream schedules")

    async def _run_scheduler(self, scheduler: Scheduler, scope: anyio.CancelScope) -> None:
        with scope:
            await scheduler.run()

    def _stop_scheduler(self) -> None:
        if self._scheduler_scope is not None:
            self._scheduler_scope.cancel()
        self._scheduler_scope = None
        self._scheduler = None

    async def _on_schedule(self, name: str, planned: datetime) -> None:
        target = self._schedule_targets.get(name)
        if target is None:  # a schedule a reload just removed
            return
        database, kind = target
        settings = self._settings.databases.get(database)
        # SQL Server backups have a kind; the other engines' have their settings' mode
        mode = kind if settings is not None and settings.kind == "mssql" else None
        if self.manager.waiting(database, mode):
            # e.g. log backups every 5 minutes behind a 3-hour full: one waiting is
            # enough, it will take everything since the last one
            log.warning(
                "scheduled_backup_skipped",
                database=database,
                kind=kind,
                planned=planned.isoformat(),
                reason="the same backup is still queued",
            )
            return
        try:
            await self.manager.submit(
                JobRequest(JobType.BACKUP, database, trigger="schedule", mode=mode)
            )
        except ServiceError as exc:
            log.error(
                "scheduled_backup_refused",
                database=database,
                kind=kind,
                planned=planned.isoformat(),
                error=str(exc),
            )

    # --- systemd ----------------------------------------------------------------------

    def _status_line(self) -> str:
        counts = self._manager.counts if self._manager is not None else {}
        running, queued = counts.get("running", 0), counts.get("queued", 0)
        where = ", ".join(self.addresses) or "no API"
        return (
            f"ready: {running} job(s) running, {queued} queued; "
            f"{len(self._settings.databases)} database(s); API {where}"
        )

    def _tell_status(self, text: str) -> None:
        if self._notify is not None:
            self._notify.status(text)

    async def _status_updates(self) -> None:
        last = ""
        while True:
            await anyio.sleep(_STATUS_EVERY)
            if self._shutting_down:
                continue  # the STOPPING status stays
            line = self._status_line()
            if line != last:
                self._tell_status(line)
                last = line

    # --- event-loop lag -----------------------------------------------------------

    async def _lag_probe(self) -> None:
        while True:
            start = anyio.current_time()
            await anyio.sleep(_LAG_INTERVAL)
            self.metrics.observe_lag(max(0.0, anyio.current_time() - start - _LAG_INTERVAL))


_KIND_ORDER = {kind: i for i, kind in enumerate(SCHEDULE_KINDS)}


def _schedules(settings: Settings) -> dict[str, tuple[CronExpr, str, str]]:
    """Schedule name (module doc: Schedules) -> (cron, database, backup kind). The
    names sort in the order simultaneous fires run: ``app`` < ``app:diff`` < ``app:log``."""
    found: dict[str, tuple[CronExpr, str, str]] = {}
    for database, table in settings.databases.items():
        for kind, cron in table.schedules.items():
            name = database if kind == "full" else f"{database}:{kind}"
            found[name] = (cron, database, kind)
    return found


def _interval(cron: CronExpr, tz: tzinfo, now: datetime) -> float:
    """The longest gap (seconds) between two consecutive fires of ``cron`` in ``tz``
    over the next ``_INTERVAL_DAYS`` days or ``_INTERVAL_FIRES`` fires (module doc)."""
    end = now + timedelta(days=_INTERVAL_DAYS)
    previous = next_fire(cron, now, tz)
    longest = 0.0
    for _ in range(_INTERVAL_FIRES):
        if previous > end:
            break
        following = next_fire(cron, previous, tz)
        # timestamps: two datetimes of one zone subtract as wall times (DST ignored)
        longest = max(longest, following.timestamp() - previous.timestamp())
        previous = following
    return longest


def _clock_and_sleep(
    speedup: float | None,
) -> tuple[Callable[[], datetime], Callable[[float], Awaitable[None]]]:
    if speedup is None or speedup == 1:
        return functools.partial(datetime.now, UTC), anyio.sleep
    origin_wall, origin = datetime.now(UTC), time.monotonic()

    def clock() -> datetime:
        return origin_wall + timedelta(seconds=(time.monotonic() - origin) * speedup)

    async def sleep(seconds: float) -> None:
        await anyio.sleep(seconds / speedup)

    return clock, sleep


def _started_fields(settings: Settings, addresses: list[str]) -> dict[str, Any]:
    summary = settings_summary(settings)
    return {
        "pid": os.getpid(),
        "addresses": addresses,
        "state_dir": summary["service"]["state_dir"],
        "databases": sorted(summary["databases"]),
        "max_jobs": summary["service"]["max_jobs"],
        "max_queued": summary["service"]["max_queued"],
    }


def _lock(path: Path) -> int:
    """Take the state directory's lock (module doc); the open descriptor."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        finally:
            os.close(fd)
        raise StateError(
            f"another vdistream service (pid {holder}) uses the state directory "
            f"{path.parent}: one service per state directory"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _unlock(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
