"""The daemon's Prometheus metrics, in a ``CollectorRegistry`` of its own.

Nothing is registered in ``prometheus_client``'s global registry: a host application
that embeds the service passes its own registry (or lets the service make one) and
decides where it is exposed; the control API serves it at ``GET /metrics``.

==========================================================  =========  ===================
metric                                                      type       labels
==========================================================  =========  ===================
``vdistream_device_bytes_total``                            counter    database, device
``vdistream_device_commands_total``                         counter    database, device
``vdistream_throughput_bytes_per_second``                   gauge      database
``vdistream_buffers_in_use``                                gauge      database
``vdistream_jobs_total``                                    counter    kind, outcome
``vdistream_job_duration_seconds``                          histogram  kind
``vdistream_jobs_current``                                  gauge      state (queued, running)
``vdistream_aborts_total``                                  counter    kind, cause
``vdistream_refused_jobs_total``                            counter    kind, reason
``vdistream_retries_total``                                 counter    operation
``vdistream_retention_deleted_backups_total``               counter    database
``vdistream_seconds_since_last_verified_backup``            gauge      database
``vdistream_last_verified_backup_timestamp_seconds``        gauge      database
``vdistream_event_loop_lag_seconds``                        histogram
``vdistream_event_loop_lag_max_seconds``                    gauge
``vdistream_ready``                                         gauge
``vdistream_start_time_seconds``                            gauge
``vdistream_database_jobs_total``                           counter    database, kind, outcome
``vdistream_last_success_timestamp_seconds``                gauge      database, kind
``vdistream_schedule_interval_seconds``                     gauge      database, kind
``vdistream_next_backup_timestamp_seconds``                 gauge      database, kind
``vdistream_debris_removed_total``                          counter    database
``vdistream_job_last_progress_timestamp_seconds``           gauge      database, job_id, kind
``vdistream_job_device_bytes``                              gauge      database, job_id, device
``vdistream_job_device_rate_bytes_per_second``              gauge      database, job_id, device
``process_*`` (resident memory, open fds, CPU)              various
==========================================================  =========  ===================

The alert rules and the dashboard in ``contrib/`` are written against these names (a
test checks every name they use against the daemon's real ``/metrics``):

* ``vdistream_database_jobs_total`` counts ended jobs like ``vdistream_jobs_total``
  with the database too (``kind`` backup, restore, verify; ``outcome`` succeeded,
  failed, aborted), told by the state store whenever it records a job's end
  (``JobStore.observe_ends`` -> ``job_recorded``; the jobs a restart finds
  interrupted count as failed). Every configured database's series start at 0
  (``set_databases``), so ``increase()`` sees the first failure.
* ``vdistream_last_success_timestamp_seconds``: the end time (Unix seconds) of the
  newest successful backup of each database and backup kind (SQL Server's mode
  ``full``, ``diff``, ``log``, ``copy-only``; ``full`` for the other engines), read
  from the state database at scrape time, so it survives restarts; absent while a
  database never had one (the rules then compare with ``vdistream_start_time_seconds``).
* ``vdistream_schedule_interval_seconds``: the longest gap between two consecutive
  planned backups of a database's schedule of that kind (``0 2 * * 1-5``: 259200, the
  weekend), in the service's time zone; ``vdistream_next_backup_timestamp_seconds``
  the next planned one. Only scheduled kinds have them. One alert rule covers every
  database: no success for longer than the interval plus a margin.
* ``vdistream_debris_removed_total``: objects left by killed jobs (their owners
  provably gone) that a backup's preflight sweep of the destination removed, from the
  job's result (``debris_removed``): something killed a job there.
* The ``job`` series exist while the job runs (``job`` is its id): when it last moved
  a byte (its start, until the first byte), and each device's bytes and mean rate so
  far (``device`` its index). A job that stops moving is stalled: the rules alert on
  ``time() - vdistream_job_last_progress_timestamp_seconds``.

* ``device`` is the device's index in its set (``0`` ... ``N-1``), so the label set
  stays small whatever the number of jobs.
* ``cause`` is a ``vdistream.coordinator.AbortCause`` value (``user``, ``cancelled``,
  ``engine``, ``sink``, ``watchdog``, ``server-timeout``).
* A job refused before it changed anything (a restore onto an existing target
  without ``overwrite``, a wrong, missing or needless key) is not an abort: it counts
  in ``vdistream_refused_jobs_total`` with ``reason`` ``target_exists``, ``wrong_key``,
  ``key_missing`` or ``key_not_needed``, and in ``vdistream_jobs_total`` with
  ``outcome="failed"`` (its state), never in ``vdistream_aborts_total``.
* ``vdistream_seconds_since_last_verified_backup`` is the age (now minus the end time)
  of the newest backup of each configured database whose verification succeeded,
  computed at scrape time from the state database; ``+Inf`` when the database has no
  verified backup yet. It is the gauge to alert on (``> 86400 * 1.5`` for a daily
  schedule).
* ``vdistream_retries_total`` counts storage requests retried after a transient
  failure, told by the S3 storage's hook (``vdistream.storage.s3.observe_retries``,
  set around each job's run) to ``count_retry``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.process_collector import ProcessCollector

from vdistream.service.state import JobRecord, JobState, JobType, VerifiedBackup

__all__ = ("CONTENT_TYPE", "Metrics", "RunningJob")

CONTENT_TYPE = CONTENT_TYPE_LATEST

_DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, math.inf)
_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, math.inf)


class Metrics:
    """Every metric of one service, registered in ``registry`` (a new one by default)."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        db = ("database",)
        self.device_bytes = Counter(
            "vdistream_device_bytes",
            "Bytes moved through a virtual device (backup: written, restore/verify: read)",
            (*db, "device"),
            registry=r,
        )
        self.device_commands = Counter(
            "vdistream_device_commands",
            "VDI commands completed on a virtual device",
            (*db, "device"),
            registry=r,
        )
        self.throughput = Gauge(
            "vdistream_throughput_bytes_per_second",
            "Current rate of the running jobs of a database (all devices)",
            db,
            registry=r,
        )
        self.buffers_in_use = Gauge(
            "vdistream_buffers_in_use",
            "Buffers of the running jobs' buffer areas held by devices right now",
            db,
            registry=r,
        )
        self.jobs = Counter(
            "vdistream_jobs",
            "Jobs that ended, by kind and outcome (succeeded, failed, aborted)",
            ("kind", "outcome"),
            registry=r,
        )
        self.job_duration = Histogram(
            "vdistream_job_duration_seconds",
            "How long jobs ran (from start to end, queueing excluded)",
            ("kind",),
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.jobs_current = Gauge(
            "vdistream_jobs_current", "Jobs queued or running now", ("state",), registry=r
        )
        self.aborts = Counter(
            "vdistream_aborts",
            "Jobs aborted or failed, by the cause of the abort (AbortCause)",
            ("kind", "cause"),
            registry=r,
        )
        self.refused = Counter(
            "vdistream_refused_jobs",
            "Jobs refused before they changed anything (not aborts), by reason",
            ("kind", "reason"),
            registry=r,
        )
        self.retries = Counter(
            "vdistream_retries",
            "Storage requests retried after a transient failure",
            ("operation",),
            registry=r,
        )
        self.retention_deleted = Counter(
            "vdistream_retention_deleted_backups", "Backups deleted by retention", db, registry=r
        )
        self.since_verified = Gauge(
            "vdistream_seconds_since_last_verified_backup",
            "Age of the newest verified backup of a database (+Inf: none yet)",
            db,
            registry=r,
        )
        self.last_verified = Gauge(
            "vdistream_last_verified_backup_timestamp_seconds",
            "End time (Unix seconds) of the newest verified backup of a database",
            db,
            registry=r,
        )
        self.loop_lag = Histogram(
            "vdistream_event_loop_lag_seconds",
            "How late the event loop ran a periodic timer (scheduling lag)",
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.loop_lag_max = Gauge(
            "vdistream_event_loop_lag_max_seconds",
            "The largest event-loop lag seen since the last scrape",
            registry=r,
        )
        self.ready = Gauge("vdistream_ready", "1 when the service accepts jobs", registry=r)
        self.start_time = Gauge(
            "vdistream_start_time_seconds",
            "When this service started (Unix seconds)",
            registry=r,
        )
        self.start_time.set(time.time())
        self.database_jobs = Counter(
            "vdistream_database_jobs",
            "Jobs that ended, by database, kind (backup, restore, verify) and outcome "
            "(succeeded, failed, aborted)",
            ("database", "kind", "outcome"),
            registry=r,
        )
        self.last_success = Gauge(
            "vdistream_last_success_timestamp_seconds",
            "End time (Unix seconds) of the newest successful backup of a database, by "
            "backup kind (full, diff, log, copy-only)",
            ("database", "kind"),
            registry=r,
        )
        self.schedule_interval = Gauge(
            "vdistream_schedule_interval_seconds",
            "The longest gap between two planned backups of a database's schedule, by kind",
            ("database", "kind"),
            registry=r,
        )
        self.next_backup = Gauge(
            "vdistream_next_backup_timestamp_seconds",
            "When the next planned backup of a database's schedule fires (Unix seconds)",
            ("database", "kind"),
            registry=r,
        )
        self.debris_removed = Counter(
            "vdistream_debris_removed",
            "Objects of killed jobs (owners provably gone) removed by a backup's preflight sweep",
            db,
            registry=r,
        )
        self.job_last_progress = Gauge(
            "vdistream_job_last_progress_timestamp_seconds",
            "When a running job last moved a byte, or started (Unix seconds)",
            ("database", "job_id", "kind"),
            registry=r,
        )
        self.job_device_bytes = Gauge(
            "vdistream_job_device_bytes",
            "Bytes a running job's device moved so far",
            ("database", "job_id", "device"),
            registry=r,
        )
        self.job_device_rate = Gauge(
            "vdistream_job_device_rate_bytes_per_second",
            "Mean rate of a running job's device since it opened",
            ("database", "job_id", "device"),
            registry=r,
        )
        if process:
            ProcessCollector(registry=r)
        self._lag_max = 0.0
        self._verified_labels: set[str] = set()
        self._verified_timestamps: set[str] = set()
        self._databases: set[str] = set()
        self._successes: set[tuple[str, str]] = set()
        self._scheduled: set[tuple[str, str]] = set()
        self._next: set[tuple[str, str]] = set()
        #: job id -> (database, kind, device label sets) of the running jobs' series
        self._job_series: dict[str, tuple[str, str, set[str]]] = {}

    def job_ended(
        self, kind: str, state: str, seconds: float | None, refused: str | None, cause: str | None
    ) -> None:
        """Count a job's end: its outcome, its duration (``None``: it never started),
        and its refusal or else, unless it succeeded, its abort cause (module doc)."""
        self.jobs.labels(kind, state).inc()
        if seconds is not None:
            self.job_duration.labels(kind).observe(seconds)
        if refused is not None:
            self.refused.labels(kind, refused).inc()
        elif state != "succeeded" and cause is not None:
            self.aborts.labels(kind, cause).inc()

    def count_retry(self, operation: str) -> None:
        """One storage request retried (the ``observe_retries`` callback)."""
        self.retries.labels(operation or "unknown").inc()

    def observe_lag(self, seconds: float) -> None:
        self.loop_lag.observe(seconds)
        self._lag_max = max(self._lag_max, seconds)

    def set_verified(
        self, databases: Iterable[str], verified: Mapping[str, VerifiedBackup], now: datetime
    ) -> None:
        """Refresh the last-verified gauges (called at scrape time)."""
        names = set(databases)
        for gone in self._verified_labels - names:
            self.since_verified.remove(gone)
            if gone in self._verified_timestamps:
                self.last_verified.remove(gone)
                self._verified_timestamps.discard(gone)
        for name in names:
            record = verified.get(name)
            if record is None:
                self.since_verified.labels(name).set(math.inf)
                continue
            age = (now - record.backup_ended).total_seconds()
            self.since_verified.labels(name).set(max(age, 0.0))
            self.last_verified.labels(name).set(record.backup_ended.timestamp())
            self._verified_timestamps.add(name)
        self._verified_labels = names

    def set_databases(self, databases: Iterable[str]) -> None:
        """Start every per-database counter of ``databases`` at 0 (module doc); the
        series of databases no longer configured keep their last value."""
        for name in set(databases) - self._databases:
            for kind in JobType:
                for outcome in (JobState.SUCCEEDED, JobState.FAILED, JobState.ABORTED):
                    self.database_jobs.labels(name, kind.value, outcome.value)
            self.debris_removed.labels(name)
            self._databases.add(name)

    def job_recorded(self, record: JobRecord) -> None:
        """Count a job's end from its final record (``JobStore.observe_ends``):
        ``vdistream_database_jobs_total`` and the debris its backup swept; its running
        series go at once."""
        if not record.state.terminal:
            return
        self._forget_job(record.id)  # at once, not at the next progress tick
        self.database_jobs.labels(record.database, record.kind.value, record.state.value).inc()
        result: Mapping[str, Any] = record.result or {}
        debris = result.get("debris_removed")
        if isinstance(debris, int) and not isinstance(debris, bool) and debris > 0:
            self.debris_removed.labels(record.database).inc(debris)

    def set_successes(self, successes: Mapping[tuple[str, str], datetime]) -> None:
        """Refresh ``vdistream_last_success_timestamp_seconds`` (at scrape time) from
        ``{(database, kind): ended}``."""
        _replace(
            self.last_success, self._successes, {k: v.timestamp() for k, v in successes.items()}
        )
        self._successes = set(successes)

    def set_schedules(
        self,
        intervals: Mapping[tuple[str, str], float],
        next_fires: Mapping[tuple[str, str], datetime],
    ) -> None:
        """Refresh the schedule gauges from ``{(database, kind): seconds}`` and
        ``{(database, kind): next fire}``; kinds no longer scheduled lose their series."""
        _replace(self.schedule_interval, self._scheduled, intervals)
        self._scheduled = set(intervals)
        _replace(self.next_backup, self._next, {k: v.timestamp() for k, v in next_fires.items()})
        self._next = set(next_fires)

    def set_running(self, jobs: Iterable[RunningJob]) -> None:
        """Set the running jobs' series (module doc) and remove those of jobs that
        ended."""
        seen: set[str] = set()
        for job in jobs:
            seen.add(job.id)
            old = self._job_series.get(job.id)
            devices = {str(index) for index, _, _ in job.devices}
            if old is not None:
                for gone in old[2] - devices:
                    self.job_device_bytes.remove(job.database, job.id, gone)
                    self.job_device_rate.remove(job.database, job.id, gone)
            self.job_last_progress.labels(job.database, job.id, job.kind).set(job.last_progress)
            for index, moved, rate in job.devices:
                self.job_device_bytes.labels(job.database, job.id, str(index)).set(moved)
                self.job_device_rate.labels(job.database, job.id, str(index)).set(rate)
            self._job_series[job.id] = (job.database, job.kind, devices)
        for job_id in set(self._job_series) - seen:
            self._forget_job(job_id)

    def _forget_job(self, job_id: str) -> None:
        """Remove the series of a job that is no longer running."""
        found = self._job_series.pop(job_id, None)
        if found is None:
            return
        database, kind, labels = found
        self.job_last_progress.remove(database, job_id, kind)
        for label in labels:
            self.job_device_bytes.remove(database, job_id, label)
            self.job_device_rate.remove(database, job_id, label)

    def render(self) -> bytes:
        """The exposition text; resets the lag maximum."""
        self.loop_lag_max.set(self._lag_max)
        self._lag_max = 0.0
        return generate_latest(self.registry)


@dataclasses.dataclass(frozen=True)
class RunningJob:
    """What ``Metrics.set_running`` shows of one running job."""

    id: str
    database: str
    kind: str
    #: Unix seconds: when it last moved a byte (its start, until the first)
    last_progress: float
    #: (device index, bytes so far, mean rate since it opened)
    devices: tuple[tuple[int, int, float], ...] = ()


def _replace(
    gauge: Gauge, old: set[tuple[str, str]], values: Mapping[tuple[str, str], float]
) -> None:
    """Set ``gauge`` to ``values`` by label pair; remove the pairs of ``old`` not in it."""
    for gone in old - set(values):
        gauge.remove(*gone)
    for labels, value in values.items():
        gauge.labels(*labels).set(value)
