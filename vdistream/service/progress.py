"""The running jobs' progress: sampled every tick into their live view and the metrics.

``JobProgress`` is one job's last sample (the ``progress`` of its JSON form), what
of its device counters the metrics already counted, and when it last moved a byte.
``ProgressTicker.run`` samples every running job each ``tick`` seconds, sets the
per-database throughput and buffers-in-use gauges and the running jobs' own series
(``Metrics.set_running``: last progress, per-device bytes and rate; a job counts as
progressing from its start, so one stuck before its first byte is seen too), cancels
jobs still running ``abort_fallback`` seconds after their abort
(``LiveJob.force_if_overdue``) and writes the progress to the store every
``persist_every`` seconds.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import anyio

from vdistream.coordinator import Job, JobStatus
from vdistream.log import get_logger
from vdistream.service.metrics import Metrics, RunningJob
from vdistream.service.state import WRITE_TIMEOUT, JobStore, StateError

if TYPE_CHECKING:
    from vdistream.service.runners import LiveJob

__all__ = ("MOVING", "JobProgress", "ProgressTicker")

log = get_logger(__name__)

#: The coordinator states in which a job moves data (and ``Job.abort`` stops it).
MOVING = (JobStatus.RUNNING, JobStatus.COMMITTING)


@dataclasses.dataclass(eq=False)
class JobProgress:
    """One job's progress as last sampled (module doc)."""

    live: dict[str, Any] | None = None
    #: per device index: (bytes, commands) already counted in the metrics
    counted: dict[int, tuple[int, int]] = dataclasses.field(default_factory=dict)
    #: the bytes moved at the last progress, and when (Unix seconds; None: not seen yet)
    progressed_bytes: int = 0
    progressed_at: float | None = None

    def running(self, job_id: str, database: str, kind: str, now: float) -> RunningJob:
        """The metrics' view of the running job (``Metrics.set_running``) as of the
        last sample; ``now`` (Unix seconds) is its last progress if it moved since."""
        devices = () if self.live is None else self.live["devices"]
        moved = sum(d["bytes"] for d in devices)
        if self.progressed_at is None or moved > self.progressed_bytes:
            self.progressed_bytes, self.progressed_at = moved, now
        return RunningJob(
            job_id,
            database,
            kind,
            self.progressed_at,
            tuple((d["index"], d["bytes"], d["rate"]) for d in devices),
        )

    def sample(self, job: Job | None, database: str, metrics: Metrics) -> dict[str, Any] | None:
        """Take the coordinator job's progress into ``live`` and the device counters."""
        if job is None:
            return self.live
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
            seen = self.counted.get(index, (0, 0))
            now = (device.bytes, device.commands)
            for counter, new, old in zip(
                (metrics.device_bytes, metrics.device_commands), now, seen, strict=True
            ):
                if new > old:
                    counter.labels(database, str(index)).inc(new - old)
            self.counted[index] = (max(now[0], seen[0]), max(now[1], seen[1]))
        self.live = {
            "kind": job.kind.value,
            "status": job.status.value,
            "bytes": snap.bytes,
            "rate": round(snap.rate, 1),
            "elapsed": round(snap.elapsed, 3),
            "devices": devices,
        }
        return self.live


@dataclasses.dataclass(frozen=True)
class ProgressTicker:
    """Samples, gauges, forces overdue aborts and persists progress (module doc)."""

    store: JobStore
    metrics: Metrics
    tick: float
    persist_every: float
    abort_fallback: float

    async def run(
        self, running: Callable[[], list[LiveJob]], databases: Callable[[], Iterable[str]]
    ) -> None:
        """Tick until cancelled over ``running()``, gauging every name of ``databases()``."""
        since_persist = 0.0
        while True:
            await anyio.sleep(self.tick)
            self._gauge(running(), databases())
            now = anyio.current_time()
            for job in running():
                job.force_if_overdue(now, self.abort_fallback)
            since_persist += self.tick
            if since_persist >= self.persist_every:
                since_persist = 0.0
                await self._persist(running())

    def _gauge(self, jobs: list[LiveJob], databases: Iterable[str]) -> None:
        rates: dict[str, float] = defaultdict(float)
        buffers: dict[str, int] = defaultdict(int)
        now = time.time()
        running: list[RunningJob] = []
        for job in jobs:
            live = job.sample(self.metrics)
            running.append(job.progress.running(job.id, job.database, job.record.kind.value, now))
            coordinator = job.coordinator
            if live is not None and coordinator is not None and coordinator.status in MOVING:
                rates[job.database] += live["rate"]
                stats = coordinator.statistics()
                buffers[job.database] += stats.buffers_in_use if stats is not None else 0
        for name in set(databases) | set(rates):
            self.metrics.throughput.labels(name).set(rates.get(name, 0.0))
            self.metrics.buffers_in_use.labels(name).set(buffers.get(name, 0))
        self.metrics.set_running(running)

    async def _persist(self, jobs: list[LiveJob]) -> None:
        for job in jobs:
            live = job.progress.live
            if job.finished or live is None:
                continue
            with anyio.move_on_after(WRITE_TIMEOUT):
                try:
                    await self.store.update(job.id, progress=live)
                except StateError as exc:
                    log.warning("progress_not_recorded", job_id=job.id, error=str(exc))
