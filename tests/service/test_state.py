"""JobStore: persistence, transitions, mark_interrupted, concurrency, schema versions."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest
import pytest_asyncio

from vdistream.service import (
    INTERRUPTED_QUEUED_REASON,
    INTERRUPTED_REASON,
    SCHEMA_VERSION,
    JobNotFoundError,
    JobRecord,
    JobState,
    JobStore,
    JobType,
    StateError,
    new_job_id,
)
from vdistream.service.state import APPLICATION_ID

T0 = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "state.db"


@pytest_asyncio.fixture
async def store(db_path: Path) -> AsyncIterator[JobStore]:
    async with await JobStore.open(db_path, clock=Clock()) as s:
        yield s


def job(kind: JobType = JobType.BACKUP, database: str = "app", **fields: object) -> JobRecord:
    return JobRecord.new(kind, database, **fields)


# --- opening ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_open_creates_a_versioned_wal_database(db_path: Path) -> None:
    store = await JobStore.open(db_path)
    await store.close()
    assert db_path.parent.stat().st_mode & 0o777 == 0o700
    con = sqlite3.connect(db_path)
    try:
        assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert con.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert tables == {"jobs", "last_verified"}
    finally:
        con.close()


@pytest.mark.asyncio
async def test_a_newer_schema_version_is_refused(db_path: Path) -> None:
    await (await JobStore.open(db_path)).close()
    con = sqlite3.connect(db_path)
    con.execute("PRAGMA user_version = 99")
    con.close()
    with pytest.raises(StateError, match=r"schema version 99, newer than .* \(1\).*Upgrade"):
        await JobStore.open(db_path)
    con = sqlite3.connect(db_path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == 99  # untouched
    con.close()


@pytest.mark.asyncio
async def test_foreign_files_are_refused(tmp_path: Path) -> None:
    other_app = tmp_path / "other.db"
    con = sqlite3.connect(other_app)
    con.execute("PRAGMA application_id = 1234")
    con.close()
    with pytest.raises(StateError, match="another application"):
        await JobStore.open(other_app)

    unversioned = tmp_path / "unversioned.db"
    con = sqlite3.connect(unversioned)
    con.execute("CREATE TABLE t (x)")
    con.close()
    with pytest.raises(StateError, match="not a vdistream state database"):
        await JobStore.open(unversioned)

    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(StateError, match="not a usable SQLite state database"):
        await JobStore.open(garbage)


@pytest.mark.asyncio
async def test_closed_store_refuses_calls(db_path: Path) -> None:
    store = await JobStore.open(db_path)
    await store.close()
    await store.close()  # idempotent
    with pytest.raises(StateError, match="closed"):
        await store.get("x")


# --- jobs ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_add_get_roundtrip_every_field(store: JobStore) -> None:
    record = JobRecord(
        id=new_job_id(),
        kind=JobType.RESTORE,
        database="billing",
        state=JobState.RUNNING,
        created=T0,
        started=T0 + timedelta(seconds=1),
        ended=None,
        progress={"devices": [{"bytes": 10}, {"bytes": 20}]},
        result=None,
        error=None,
        storage_url="/var/backups/x",
        storage_keys=("b1/stream-01-of-02.vdi", "b1/stream-02-of-02.vdi"),
        backup_id="b1",
        params={"target": "/srv/restore", "overwrite": False},
    )
    assert await store.add(record) == record
    assert await store.get(record.id) == record


@pytest.mark.asyncio
async def test_duplicate_and_missing_ids(store: JobStore) -> None:
    record = await store.add(job())
    with pytest.raises(StateError, match="already exists"):
        await store.add(record)
    with pytest.raises(JobNotFoundError):
        await store.get("nope")
    with pytest.raises(LookupError):
        await store.update("nope", state=JobState.RUNNING)


@pytest.mark.asyncio
async def test_persistence_across_close_and_reopen(db_path: Path) -> None:
    store = await JobStore.open(db_path)
    a = await store.add(job(database="a"))
    b = await store.add(job(JobType.VERIFY, database="b"))
    await store.update(a.id, state=JobState.RUNNING, add_storage_keys=["k1"])
    await store.update(a.id, state="succeeded", result={"bytes": 123})
    await store.record_verified("a", "backup-1", backup_ended=T0, job_id=b.id)
    await store.close()

    again = await JobStore.open(db_path)
    try:
        got = await again.get(a.id)
        assert got.state is JobState.SUCCEEDED
        assert got.result == {"bytes": 123}
        assert got.storage_keys == ("k1",)
        assert got.started is not None
        assert got.ended is not None
        assert got.started <= got.ended
        assert (await again.get(b.id)).kind is JobType.VERIFY
        verified = await again.last_verified("a")
        assert verified is not None
        assert (verified.backup_id, verified.backup_ended, verified.job_id) == (
            "backup-1",
            T0,
            b.id,
        )
    finally:
        await again.close()


@pytest.mark.asyncio
async def test_transitions_and_automatic_times(store: JobStore) -> None:
    record = await store.add(job())
    assert record.state is JobState.QUEUED
    assert (record.started, record.ended) == (None, None)
    running = await store.update(record.id, state=JobState.RUNNING)
    assert running.started is not None
    assert running.ended is None
    progressed = await store.update(record.id, progress={"devices": [{"bytes": 5}]})
    assert progressed.progress == {"devices": [{"bytes": 5}]}
    assert progressed.started == running.started
    done = await store.update(record.id, state=JobState.FAILED, error="disk full")
    assert done.ended is not None
    assert done.ended > done.started  # type: ignore[operator]
    assert done.error == "disk full"
    # terminal is final, other fields may still be written
    with pytest.raises(StateError, match=r"cannot go from failed to running.*final"):
        await store.update(record.id, state=JobState.RUNNING)
    with pytest.raises(StateError, match="cannot go from failed to succeeded"):
        await store.update(record.id, state=JobState.SUCCEEDED)
    same = await store.update(record.id, state=JobState.FAILED, result={"cleaned": True})
    assert same.result == {"cleaned": True}
    assert same.ended == done.ended


@pytest.mark.asyncio
async def test_illegal_transitions_from_queued(store: JobStore) -> None:
    record = await store.add(job())
    with pytest.raises(StateError, match="queued to succeeded"):
        await store.update(record.id, state=JobState.SUCCEEDED)
    aborted = await store.update(record.id, state=JobState.ABORTED, error="cancelled by user")
    assert aborted.started is None
    assert aborted.ended is not None


@pytest.mark.asyncio
async def test_explicit_times_and_clearing_fields(store: JobStore) -> None:
    record = await store.add(job(error="x", result={"a": 1}))
    start = T0 + timedelta(hours=1)
    updated = await store.update(
        record.id, state="running", started=start, error=None, result=None, backup_id="b9"
    )
    assert updated.started == start
    assert (updated.error, updated.result, updated.backup_id) == (None, None, "b9")
    replaced = await store.update(record.id, storage_keys=["z", "y"], add_storage_keys=["y", "x"])
    assert replaced.storage_keys == ("z", "y", "x")


@pytest.mark.asyncio
async def test_bad_values_are_refused(store: JobStore) -> None:
    with pytest.raises(ValueError, match="naive"):
        await store.add(job(created=datetime(2024, 1, 1)))
    record = await store.add(job())
    with pytest.raises(TypeError):
        await store.update(record.id, progress={"x": object()})
    with pytest.raises(ValueError):
        await store.update(record.id, state="paused")


@pytest.mark.asyncio
async def test_list_filters_and_order(store: JobStore) -> None:
    made = []
    for i in range(6):
        kind = JobType.BACKUP if i % 2 == 0 else JobType.VERIFY
        made.append(
            await store.add(
                job(kind, database="a" if i < 3 else "b", created=T0 + timedelta(minutes=i))
            )
        )
    await store.update(made[1].id, state=JobState.RUNNING)
    await store.update(made[4].id, state=JobState.RUNNING)
    await store.update(made[4].id, state=JobState.SUCCEEDED)

    everything = await store.list()
    assert [j.id for j in everything] == [j.id for j in reversed(made)]
    assert [j.id for j in await store.list(2)] == [made[5].id, made[4].id]
    assert [j.id for j in await store.list(state=JobState.RUNNING)] == [made[1].id]
    queued_or_running = await store.list(state=[JobState.QUEUED, "running"])
    assert {j.id for j in queued_or_running} == {made[i].id for i in (0, 1, 2, 3, 5)}
    assert [j.id for j in await store.list(database="b", kind="verify")] == [
        made[5].id,
        made[3].id,
    ]
    assert await store.list(0) == []
    assert len(await store.list(None)) == 6
    with pytest.raises(ValueError):
        await store.list(-1)


@pytest.mark.asyncio
async def test_delete_finished(store: JobStore) -> None:
    old = await store.add(job())
    await store.update(old.id, state=JobState.ABORTED, ended=T0 - timedelta(days=40))
    keep = await store.add(job())
    assert await store.delete_finished(T0 - timedelta(days=30)) == 1
    assert [j.id for j in await store.list()] == [keep.id]


@pytest.mark.asyncio
async def test_delete_finished_keeps_each_backups_latest_verification(store: JobStore) -> None:
    """Old jobs go, except the latest finished verification of each backup, which
    retention still asks (``verify_outcomes``) however old it is."""
    old = T0 - timedelta(days=400)

    async def verify(backup_id: str, state: JobState, minutes: int) -> JobRecord:
        record = await store.add(
            job(JobType.VERIFY, backup_id=backup_id, created=old + timedelta(minutes=minutes))
        )
        await store.update(record.id, state=JobState.RUNNING)
        return await store.update(record.id, state=state, ended=old + timedelta(minutes=minutes))

    await verify("app.1", JobState.FAILED, 1)
    latest_1 = await verify("app.1", JobState.SUCCEEDED, 2)
    latest_2 = await verify("app.2", JobState.FAILED, 3)
    backup = await store.add(job(backup_id="app.1", created=old))
    await store.update(backup.id, state=JobState.ABORTED, ended=old)
    assert await store.verify_outcomes("app", ["app.1", "app.2", "app.3"]) == {
        "app.1": True,
        "app.2": False,
    }
    assert await store.delete_finished(T0 - timedelta(days=90)) == 2
    assert {j.id for j in await store.list()} == {latest_1.id, latest_2.id}
    assert await store.verify_outcomes("app", ["app.1", "app.2"]) == {
        "app.1": True,
        "app.2": False,
    }
    assert await store.verify_outcomes("other", ["app.1"]) == {}
    assert await store.verify_outcomes("app", []) == {}


# --- restart ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_mark_interrupted_after_a_crash(db_path: Path) -> None:
    store = await JobStore.open(db_path)
    running = await store.add(job(storage_url="/var/backups/x", created=T0))
    await store.update(running.id, state=JobState.RUNNING, add_storage_keys=["b1/stream-01"])
    await store.update(running.id, add_storage_keys=["b1/stream-02"], backup_id="b1")
    queued = await store.add(job(JobType.VERIFY, created=T0 + timedelta(seconds=1)))
    finished = await store.add(job(created=T0 + timedelta(seconds=2)))
    await store.update(finished.id, state=JobState.RUNNING)
    await store.update(finished.id, state=JobState.SUCCEEDED)
    # the daemon dies: no close() before the next start
    crashed = store

    restarted = await JobStore.open(db_path)
    try:
        interrupted = await restarted.mark_interrupted()
        assert [j.id for j in interrupted] == [running.id, queued.id]
        first, second = interrupted
        assert first.state is JobState.FAILED
        assert first.error == INTERRUPTED_REASON == "the daemon stopped while the job was running"
        assert first.storage_url == "/var/backups/x"
        assert first.storage_keys == ("b1/stream-01", "b1/stream-02")
        assert first.backup_id == "b1"
        assert first.ended is not None
        assert second.error == INTERRUPTED_QUEUED_REASON
        assert (await restarted.get(finished.id)).state is JobState.SUCCEEDED
        assert await restarted.mark_interrupted() == []
        assert (await restarted.get(running.id)).state is JobState.FAILED
    finally:
        await restarted.close()
        await crashed.close()


# --- concurrency --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_concurrent_updates_lose_nothing(store: JobStore) -> None:
    target = await store.add(job())
    await store.update(target.id, state=JobState.RUNNING)
    others = [await store.add(job(database=f"db{i}")) for i in range(5)]

    async def add_key(i: int) -> None:
        await store.update(target.id, add_storage_keys=[f"key-{i:03d}"])

    async def progress(record: JobRecord, i: int) -> None:
        for step in range(5):
            await store.update(record.id, progress={"step": step, "who": i})

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            for i in range(60):
                tg.start_soon(add_key, i)
            for i, record in enumerate(others):
                tg.start_soon(progress, record, i)
    got = await store.get(target.id)
    assert sorted(got.storage_keys) == [f"key-{i:03d}" for i in range(60)]
    for i, record in enumerate(others):
        assert (await store.get(record.id)).progress == {"step": 4, "who": i}


@pytest.mark.asyncio
async def test_concurrent_final_states_one_wins(store: JobStore) -> None:
    record = await store.add(job())
    await store.update(record.id, state=JobState.RUNNING)
    outcomes: list[str] = []

    async def finish(state: JobState) -> None:
        try:
            await store.update(record.id, state=state)
            outcomes.append(f"ok {state}")
        except StateError:
            outcomes.append(f"refused {state}")

    async with anyio.create_task_group() as tg:
        for i in range(10):
            tg.start_soon(finish, JobState.SUCCEEDED if i % 2 else JobState.ABORTED)
    final = (await store.get(record.id)).state
    loser = JobState.ABORTED if final is JobState.SUCCEEDED else JobState.SUCCEEDED
    assert outcomes.count(f"refused {loser}") == 5
    assert outcomes.count(f"ok {final}") == 5


@pytest.mark.asyncio
async def test_a_cancelled_caller_does_not_break_the_store(store: JobStore) -> None:
    record = await store.add(job())
    with anyio.move_on_after(0):
        await store.update(record.id, progress={"a": 1})
    assert (await store.get(record.id)).id == record.id


@pytest.mark.asyncio
async def test_two_stores_on_one_file(db_path: Path) -> None:
    a = await JobStore.open(db_path)
    b = await JobStore.open(db_path)
    try:
        record = await a.add(job())
        await b.update(record.id, state=JobState.RUNNING)
        assert (await a.get(record.id)).state is JobState.RUNNING
    finally:
        await a.close()
        await b.close()


# --- last verified backups ----------------------------------------------------------------


@pytest.mark.asyncio
async def test_last_verified_keeps_the_newest_backup(store: JobStore) -> None:
    assert await store.last_verified("app") is None
    first = await store.record_verified("app", "b2", backup_ended=T0, job_id="j1")
    assert first.backup_id == "b2"
    assert first.verified_at > T0  # the store's clock
    # verifying an older backup later does not replace the newer one
    still = await store.record_verified("app", "b1", backup_ended=T0 - timedelta(days=1))
    assert still.backup_id == "b2"
    newer = await store.record_verified(
        "app", "b3", backup_ended=T0 + timedelta(days=1), verified_at=T0 + timedelta(days=2)
    )
    assert (newer.backup_id, newer.verified_at, newer.job_id) == (
        "b3",
        T0 + timedelta(days=2),
        None,
    )
    await store.record_verified("other", "x1", backup_ended=T0)
    assert set(await store.all_verified()) == {"app", "other"}
    assert not await store.forget_verified("app", "b2")
    assert await store.forget_verified("app", "b3")
    assert await store.last_verified("app") is None


# --- ids ----------------------------------------------------------------------------------


def test_job_ids_sort_by_time_and_are_unique() -> None:
    made = [new_job_id() for _ in range(2000)]
    assert made == sorted(made)
    assert len(set(made)) == len(made)
    fixed = new_job_id(datetime(2024, 1, 31, 23, 59, 59, 123456, tzinfo=UTC))
    assert fixed.startswith("20240131T235959.123Z-")
    assert len(fixed) == len(made[0]) == 31
    earlier = new_job_id(datetime(2023, 12, 31, tzinfo=UTC))
    assert earlier < fixed
