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
``process_*`` (resident memory, open fds, CPU)              various
==========================================================  =========  ===================

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

import math
from collections.abc import Iterable, Mapping
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.process_collector import ProcessCollector

from vdistream.service.state import VerifiedBackup

__all__ = ("CONTENT_TYPE", "Metrics")

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
        if process:
            ProcessCollector(registry=r)
        self._lag_max = 0.0
        self._verified_labels: set[str] = set()
        self._verified_timestamps: set[str] = set()

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

    def render(self) -> bytes:
        """The exposition text; resets the lag maximum."""
        self.loop_lag_max.set(self._lag_max)
        self._lag_max = 0.0
        return generate_latest(self.registry)
