"""The daemon backs up a SQL Server database on its schedules, against the stand-in.

Real processes: ``vdistream serve`` (its schedules' clock ``SPEEDUP`` times fast), the
stand-in SQL Server, the stand-in ``sqlcmd`` for every statement (``?trigger=sqlcmd``)
and the stand-in ``libsqlvdi.so`` that the daemon's jobs load. Writes go on in the
database between the backups, so every log backup carries something.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from standin.mssql.control import StandinServer
from standin.sqlvdi.build import Libraries
from tests.daemon.conftest import Daemon, wait_for, wait_job
from tests.sqlserver.standin_fixtures import sqlvdi_libs, standin  # noqa: F401  (fixtures)
from vdistream.catalog import Manifest, list_manifests
from vdistream.catalog.chain import dependencies, plan_restore
from vdistream.operations import run_chain_restore
from vdistream.service import Reason
from vdistream.storage import open_storage

pytestmark = pytest.mark.timeout(240)

MiB = 1024 * 1024
#: the schedules' minute lasts 60 / SPEEDUP seconds
SPEEDUP = 20
TYPES = {"full": "D", "diff": "I", "log": "L"}


@pytest.fixture
def writes(standin: StandinServer) -> Iterator[Callable[[], datetime]]:  # noqa: F811
    """Activity in ``erp`` every 0.3 s until the function it gives is called: that
    stops it, waits for the last write and returns the time (UTC)."""
    standin.create_database("erp", 4 * MiB, seed=7)
    stop = threading.Event()

    def work() -> None:
        while not stop.wait(0.3):
            standin.write("erp", pages=8)

    thread = threading.Thread(target=work, name="erp writes", daemon=True)

    def stopped() -> datetime:
        stop.set()
        thread.join(10)
        assert not thread.is_alive()
        return datetime.now(UTC)

    thread.start()
    yield stopped
    stopped()


async def manifests_in(dest: Path) -> list[Manifest]:
    async with open_storage(str(dest)) as storage:
        found, problems = await list_manifests(storage)
    assert problems == []
    return found


@pytest.mark.asyncio
async def test_schedules_make_a_full_then_logs_and_retention_keeps_the_chain(
    daemon_factory: Callable[..., Daemon],
    standin: StandinServer,  # noqa: F811
    sqlvdi_libs: Libraries,  # noqa: F811
    writes: Callable[[], datetime],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """1. ``erp`` on the stand-in: a full every 3 minutes, a differential in the minute
       after each full, the log every minute; keep_last = 2; each backup verified
       (RESTORE VERIFYONLY on the stand-in).
    2. Until a log backup follows a second full, then one more log once the writes
       stopped: no log succeeds before the first full
       (SQL Server refuses one, 4214); the manifests record D, I and L as the job's
       mode says; full and log due together were submitted full first. A full restored
       through the daemon makes a new database; again without ``overwrite`` it is
       refused (counted as a refusal), with it it is ``REPLACE``d.
    3. Retention deleted old backups but kept every backup a kept log needs (a full
       outside keep_last among them, kept as NEEDED): the chain in the destination
       restores, and the restored database is the source's as of the last log."""
    env = {
        "VDISTREAM_SCHEDULE_SPEEDUP": str(SPEEDUP),
        "VDISTREAM_SQLVDI": str(sqlvdi_libs.client),
        "VDISTREAM_SQLCMD": str(standin.sqlcmd),
        "VDISTREAM_MSSQL_PASSWORD": standin.password,
    }
    daemon = daemon_factory(
        {
            "erp": {
                "url": standin.url("erp") + "?trigger=sqlcmd",
                "schedule": "*/3 * * * *",
                "schedule_diff": "1-59/3 * * * *",
                "schedule_log": "* * * * *",
                "retention": {"keep_last": 2},
                "devices": 2,
            }
        },
        env=env,
    ).start()
    async with daemon.client() as client:
        (row,) = await client.databases()
        assert row["kind"] == "mssql"
        assert list(row["next_backups"]) == ["full", "diff", "log"]

        async def second_chain() -> list[dict[str, Any]]:
            jobs = await client.jobs(kind="backup", limit="200")
            done = sorted(
                (j for j in jobs if j["state"] == "succeeded"), key=lambda j: j["created"]
            )
            modes = [j["params"]["mode"] for j in done]
            fulls = [i for i, m in enumerate(modes) if m == "full"]
            return jobs if len(fulls) >= 2 and "log" in modes[fulls[1] :] else []

        await wait_for(second_chain, timeout=150, what="a log backup after a second full")
        quiet = writes()  # no more changes: the next log backup holds the last of them

        async def settled() -> list[dict[str, Any]]:
            """A log backup that started after the writes stopped, and its verification."""
            jobs = await client.jobs(limit="400")
            late = [
                j
                for j in jobs
                if j["kind"] == "backup"
                and j["params"]["mode"] == "log"
                and j["state"] == "succeeded"
                and datetime.fromisoformat(j["started"]) > quiet
            ]
            verified = {
                j["backup_id"] for j in jobs if j["kind"] == "verify" and j["state"] == "succeeded"
            }
            return jobs if any(j["backup_id"] in verified for j in late) else []

        jobs_now = await wait_for(
            settled, timeout=60, what="a verified log after the writes stopped"
        )
        # one backup restored through the daemon: a full, into a new database, then over it
        full = max(
            (j for j in jobs_now if j["kind"] == "backup" and j["params"]["mode"] == "full"),
            key=lambda j: j["created"] if j["state"] == "succeeded" else "",
        )
        target = standin.url("erp_full") + "?trigger=sqlcmd"
        restores = []
        for overwrite in (False, False, True):
            request = {"kind": "restore", "database": "erp", "target": target}
            request |= {"backup_id": full["backup_id"], "overwrite": overwrite}
            job = await client.submit(request)
            restores.append(await wait_job(client, job["id"], timeout=60))
        metrics = await client.metrics()
    assert daemon.stop() == 0
    jobs = sorted(daemon.jobs_in_state_db(), key=lambda r: (r["created"], r["id"]))
    for job in jobs:
        job["params"] = json.loads(job["params"])
        job["result"] = json.loads(job["result"]) if job["result"] else None

    # 2. the backups as SQL Server made them
    backups = [j for j in jobs if j["kind"] == "backup"]
    assert all(j["params"]["trigger"] == "schedule" for j in backups)
    first_full = next(i for i, j in enumerate(backups) if j["params"]["mode"] == "full")
    assert backups[first_full]["state"] == "succeeded", backups[first_full]["error"]
    for early in backups[:first_full]:  # before any full: SQL Server refuses a log, a diff
        assert early["state"] == "failed", early
        refusal = {"log": "4214", "diff": "3035"}[early["params"]["mode"]]
        assert f"Msg {refusal}" in early["error"], early["error"]
    succeeded = [j for j in backups if j["state"] == "succeeded"]
    for job in succeeded:
        assert job["result"]["mode"] == job["params"]["mode"]
        assert job["result"]["sqlserver"]["type"] == TYPES[job["params"]["mode"]]
    assert {j["params"]["mode"] for j in succeeded} == {"full", "diff", "log"}
    # the minute a full and a log were both due, the full was submitted (and ran) first
    together = [
        (a, b)
        for a, b in itertools.pairwise(succeeded)
        if a["params"]["mode"] == "full" and b["params"]["mode"] == "log"
    ]
    assert together, "no minute where a full and a log fired together"
    for full, log in together:
        assert log["started"] >= full["ended"]  # the database's max_jobs = 1: queued
    assert standin.password not in json.dumps(jobs)
    assert standin.password not in daemon.log.read_text()
    assert 'vdistream_sqlserver_backups_total{database="erp",mode="log",outcome="succeeded"}' in (
        metrics
    )

    # a restore: new database, refused over it (no REPLACE), then REPLACE
    assert [r["state"] for r in restores] == ["succeeded", "failed", "succeeded"], restores
    assert "already exists" in restores[1]["error"]
    assert standin.state("erp_full") == "ONLINE"
    statements = [s for s in standin.statements() if s.startswith("RESTORE DATABASE [erp_full]")]
    assert len(statements) == 2
    assert "REPLACE" not in statements[0]
    assert "WITH REPLACE, RECOVERY" in statements[1]
    assert 'vdistream_refused_jobs_total{kind="restore",reason="target_exists"} 1.0' in metrics

    # 3. retention kept what the kept logs need
    verifications = [j for j in jobs if j["kind"] == "verify" and j["state"] == "succeeded"]
    for verify in verifications:
        checks = {c["name"]: c for c in verify["result"]["checks"]}
        assert checks["sqlserver"]["ok"], checks  # RESTORE VERIFYONLY on the stand-in
    deleted = {d for v in verifications for d in v["result"]["retention"]["deleted"]}
    assert deleted, "retention deleted nothing"
    left = await manifests_in(daemon.dest)
    by_id = {m.backup_id: m for m in left}
    assert not deleted & set(by_id)
    needs = dependencies(left)
    for backup_id in by_id:
        assert needs[backup_id] <= set(by_id), (backup_id, needs[backup_id])
    needed = {
        row["id"]
        for v in verifications
        for row in v["result"]["retention"]["keep"]
        if Reason.NEEDED.value in row["reasons"]
    }
    assert any(by_id[i].mode == "full" for i in needed & set(by_id)), needed
    plan = plan_restore(left, "erp")
    assert plan.steps[0].kind == "full"
    assert plan.steps[-1].kind == "log"

    monkeypatch.setenv("VDISTREAM_SQLVDI", str(sqlvdi_libs.client))
    monkeypatch.setenv("VDISTREAM_SQLCMD", str(standin.sqlcmd))
    monkeypatch.setenv("VDISTREAM_MSSQL_PASSWORD", standin.password)
    outcome = await run_chain_restore(
        str(daemon.dest), standin.url("erp_copy") + "?trigger=sqlcmd", to=None, database="erp"
    )
    assert outcome.ok, outcome.error
    assert standin.checksum("erp_copy") == standin.checksum("erp")


@pytest.mark.asyncio
async def test_abort_and_shutdown_end_a_sql_server_backup_as_for_the_other_engines(
    daemon_factory: Callable[..., Daemon],
    standin: StandinServer,  # noqa: F811
    sqlvdi_libs: Libraries,  # noqa: F811
) -> None:
    """1. A backup paced by the stand-in (slow) is aborted through the API while it moves:
       the job ends ``aborted`` (cause user), SQL Server's statement ends, the
       destination holds nothing of it.
    2. Another one is running when the daemon gets SIGTERM: aborted (cause shutdown),
       the daemon exits 0, nothing is left in the destination or in /dev/shm (the
       ``standin`` fixture checks that at teardown)."""
    standin.create_database("erp", 24 * MiB, seed=3)
    standin.set_pace(2 * MiB)
    env = {
        "VDISTREAM_SQLVDI": str(sqlvdi_libs.client),
        "VDISTREAM_SQLCMD": str(standin.sqlcmd),
        "VDISTREAM_MSSQL_PASSWORD": standin.password,
    }
    daemon = daemon_factory(
        {"erp": {"url": standin.url("erp") + "?trigger=sqlcmd"}}, env=env
    ).start()
    async with daemon.client() as client:
        job = await client.submit({"kind": "backup", "database": "erp", "mode": "full"})
        await wait_job(client, job["id"], frozenset({"running"}), min_bytes=1)
        await client.abort(job["id"], "from the test")
        aborted = await wait_job(client, job["id"], timeout=60)
        assert aborted["state"] == "aborted", aborted
        assert aborted["result"]["aborted_by"] == "user"
        assert aborted["result"]["mode"] == "full"
        await wait_for(lambda: standin.running() == [], timeout=30, what="the statement ended")
        second = await client.submit({"kind": "backup", "database": "erp"})
        await wait_job(client, second["id"], frozenset({"running"}), min_bytes=1)
        metrics = await client.metrics()
    assert daemon.stop() == 0
    rows = {r["id"]: r for r in daemon.jobs_in_state_db()}
    assert rows[second["id"]]["state"] == "aborted"
    assert json.loads(rows[second["id"]]["result"])["aborted_by"] == "shutdown"
    assert json.loads(rows[second["id"]]["params"])["mode"] == "full"
    assert daemon.leftovers() == []
    assert 'vdistream_aborts_total{cause="user",kind="backup"} 1.0' in metrics
    assert (
        'vdistream_sqlserver_backups_total{database="erp",mode="full",outcome="aborted"} 1.0'
        in metrics
    )
    await wait_for(lambda: standin.running() == [], timeout=30, what="the statement ended")
    assert standin.history("erp") == []  # SQL Server recorded no backup
