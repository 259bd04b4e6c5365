"""Where the alert rules' series come from: the state store (newest successes, kept by
the history's pruning; every job's end told to an observer), the metrics' bookkeeping
(running jobs' series removed when they end, schedules' series when a kind is no
longer scheduled, debris from a job's result) and a schedule's interval."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from vdistream.service.daemon import _interval
from vdistream.service.metrics import Metrics, RunningJob
from vdistream.service.schedule import CronExpr
from vdistream.service.state import JobRecord, JobState, JobStore, JobType

T0 = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[JobStore]:
    async with await JobStore.open(tmp_path / "state.db") as s:
        yield s


async def _ended(
    store: JobStore, database: str, state: JobState, ended: datetime, **params: str
) -> JobRecord:
    record = await store.add(JobRecord.new(JobType.BACKUP, database, params=params))
    await store.update(record.id, state=JobState.RUNNING, started=ended - timedelta(minutes=1))
    return await store.update(record.id, state=state, ended=ended)


@pytest.mark.asyncio
async def test_last_successes_by_database_and_mode(store: JobStore) -> None:
    await _ended(store, "app", JobState.SUCCEEDED, T0)
    await _ended(store, "app", JobState.SUCCEEDED, T0 + timedelta(hours=1))
    await _ended(store, "app", JobState.FAILED, T0 + timedelta(hours=2))
    await _ended(store, "app", JobState.SUCCEEDED, T0 + timedelta(minutes=5), mode="log")
    await _ended(store, "other", JobState.ABORTED, T0)
    assert await store.last_successes() == {
        ("app", "full"): T0 + timedelta(hours=1),
        ("app", "log"): T0 + timedelta(minutes=5),
    }


@pytest.mark.asyncio
async def test_pruning_the_history_keeps_the_newest_success_of_each_mode(
    store: JobStore,
) -> None:
    old = await _ended(store, "app", JobState.SUCCEEDED, T0)
    newest = await _ended(store, "app", JobState.SUCCEEDED, T0 + timedelta(days=1))
    log = await _ended(store, "app", JobState.SUCCEEDED, T0, mode="log")
    failed = await _ended(store, "app", JobState.FAILED, T0 + timedelta(days=2))
    assert await store.delete_finished(T0 + timedelta(days=30)) == 2
    remaining = {r.id for r in await store.list(None)}
    assert remaining == {newest.id, log.id}
    assert old.id not in remaining
    assert failed.id not in remaining
    assert await store.last_successes() == {
        ("app", "full"): T0 + timedelta(days=1),
        ("app", "log"): T0,
    }


@pytest.mark.asyncio
async def test_every_end_is_told_once_to_the_observer(store: JobStore) -> None:
    told: list[tuple[str, JobState]] = []
    store.observe_ends(lambda record: told.append((record.id, record.state)))
    a = await store.add(JobRecord.new(JobType.BACKUP, "app"))
    await store.update(a.id, state=JobState.RUNNING)
    assert told == []
    await store.update(a.id, state=JobState.SUCCEEDED, result={"debris_removed": 2})
    await store.update(a.id, error="a later note")  # not a new end
    b = await store.add(JobRecord.new(JobType.VERIFY, "app"))
    c = await store.add(JobRecord.new(JobType.BACKUP, "app"))
    await store.update(c.id, state=JobState.RUNNING)
    interrupted = await store.mark_interrupted()
    assert [r.id for r in interrupted] == [b.id, c.id]
    assert told == [
        (a.id, JobState.SUCCEEDED),
        (b.id, JobState.FAILED),
        (c.id, JobState.FAILED),
    ]

    def broken(record: JobRecord) -> None:
        raise RuntimeError("observer bug")

    store.observe_ends(broken)
    d = await store.add(JobRecord.new(JobType.BACKUP, "app"))
    record = await store.update(d.id, state=JobState.ABORTED)  # the write still works
    assert record.state is JobState.ABORTED
    assert (await store.get(d.id)).state is JobState.ABORTED


def _value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_job_ends_count_by_database_and_debris_from_the_result() -> None:
    metrics = Metrics(CollectorRegistry(), process=False)
    metrics.set_databases(["app"])
    jobs = "vdistream_database_jobs_total"
    assert _value(metrics, jobs, database="app", kind="verify", outcome="failed") == 0
    assert _value(metrics, "vdistream_debris_removed_total", database="app") == 0
    ended = JobRecord.new(
        JobType.BACKUP, "app", state=JobState.FAILED, result={"debris_removed": 3}
    )
    metrics.job_recorded(ended)
    metrics.job_recorded(JobRecord.new(JobType.BACKUP, "app", state=JobState.RUNNING))
    assert _value(metrics, jobs, database="app", kind="backup", outcome="failed") == 1
    assert _value(metrics, "vdistream_debris_removed_total", database="app") == 3


def test_running_jobs_series_follow_the_jobs() -> None:
    metrics = Metrics(CollectorRegistry(), process=False)
    last = "vdistream_job_last_progress_timestamp_seconds"
    device = "vdistream_job_device_bytes"
    metrics.set_running([RunningJob("j1", "app", "backup", 100.0, ((0, 10, 1.0), (1, 20, 2.0)))])
    assert _value(metrics, last, database="app", job_id="j1", kind="backup") == 100.0
    assert _value(metrics, device, database="app", job_id="j1", device="1") == 20
    metrics.set_running([RunningJob("j1", "app", "backup", 150.0, ((0, 30, 1.5),))])
    assert _value(metrics, device, database="app", job_id="j1", device="1") is None
    assert _value(metrics, last, database="app", job_id="j1", kind="backup") == 150.0
    metrics.set_running([])
    assert _value(metrics, last, database="app", job_id="j1", kind="backup") is None
    assert _value(metrics, device, database="app", job_id="j1", device="0") is None
    # a job's end removes its series at once, before the next tick
    metrics.set_running([RunningJob("j2", "app", "verify", 1.0)])
    metrics.job_recorded(JobRecord.new(JobType.VERIFY, "app", id="j2", state=JobState.SUCCEEDED))
    assert _value(metrics, last, database="app", job_id="j2", kind="verify") is None


def test_schedule_series_follow_the_schedules() -> None:
    metrics = Metrics(CollectorRegistry(), process=False)
    interval = "vdistream_schedule_interval_seconds"
    metrics.set_schedules({("app", "full"): 86400.0, ("app", "log"): 300.0}, {("app", "full"): T0})
    assert _value(metrics, interval, database="app", kind="log") == 300.0
    assert (
        _value(metrics, "vdistream_next_backup_timestamp_seconds", database="app", kind="full")
        == T0.timestamp()
    )
    metrics.set_schedules({("app", "full"): 86400.0}, {})
    assert _value(metrics, interval, database="app", kind="log") is None
    assert _value(metrics, interval, database="app", kind="full") == 86400.0


@pytest.mark.parametrize(
    ("cron", "zone", "seconds"),
    [
        ("*/5 * * * *", "UTC", 300),
        ("0 3 * * *", "UTC", 86400),
        ("0 2 * * 1-5", "UTC", 3 * 86400),  # Friday to Monday
        ("@monthly", "UTC", 31 * 86400),
        ("30 1 * * *", "Europe/Berlin", 25 * 3600),  # the night the clocks go back
    ],
)
def test_a_schedules_interval_is_its_longest_gap(cron: str, zone: str, seconds: int) -> None:
    now = datetime(2024, 6, 1, tzinfo=UTC)
    assert _interval(CronExpr.parse(cron), ZoneInfo(zone), now) == seconds
