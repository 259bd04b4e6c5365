"""The daemon's life: abort through the API, SIGTERM with jobs running, kill -9 and
restart, a second signal, SIGHUP. Every test looks at the destination afterwards:
nothing of an aborted or killed backup may stay, not even a temporary file."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from tests.daemon.conftest import (
    SLOW_SOURCE,
    Daemon,
    make_sqlite,
    slow_url,
    wait_for,
    wait_job,
)
from vdistream.engines.ledger import LEDGER_DIR, ChildLedger
from vdistream.engines.process import ChildRecord
from vdistream.ownership import process_start_time
from vdistream.service import INTERRUPTED_REASON

pytestmark = pytest.mark.timeout(90)


@pytest.mark.asyncio
async def test_abort_through_the_api_mid_job_leaves_nothing(
    daemon_factory: Callable[..., Daemon],
) -> None:
    """1. A slow backup runs and has written to its devices (temporaries exist).
    2. POST /v1/jobs/{id}/abort answers 202.
    3. The job ends aborted (cause "user") within the drain; the destination is empty;
       the abort is counted in the metrics."""
    daemon = daemon_factory({"slow": {"url": slow_url()}}).start()
    async with daemon.client() as client:
        job = await client.submit({"kind": "backup", "database": "slow"})
        await wait_job(client, job["id"], frozenset({"running"}), min_bytes=1)
        assert any(name.endswith(".tmp") for name in daemon.leftovers())
        async with (
            daemon.http() as http,
            http.post(
                f"http://vdistream/v1/jobs/{job['id']}/abort", json={"reason": "test says so"}
            ) as response,
        ):
            assert response.status == 202
            assert (await response.json())["id"] == job["id"]
        done = await wait_job(client, job["id"], timeout=10)  # bounded: within the drain
        assert done["state"] == "aborted"
        assert "test says so" in done["error"]
        assert done["result"]["aborted_by"] == "user"
        metrics = await client.metrics()
    assert 'vdistream_aborts_total{cause="user",kind="backup"} 1.0' in metrics
    assert daemon.leftovers() == []
    (row,) = daemon.jobs_in_state_db()
    assert row["state"] == "aborted"
    assert daemon.stop() == 0


@pytest.mark.asyncio
async def test_sigterm_with_three_jobs_running_ends_within_the_grace_period(
    daemon_factory: Callable[..., Daemon],
) -> None:
    """1. Three slow backups run at once (max_jobs 3); a fourth request is queued.
    2. SIGTERM: the daemon exits 0 within grace_period (10 s).
    3. The state database says every job aborted ("...received SIGTERM"), the queued
       one included; the destination holds nothing; the log ends the shutdown."""
    daemon = daemon_factory(
        {"slow": {"url": slow_url(), "max_jobs": 3}},
        service={"max_jobs": 3, "grace_period": 10},
    ).start()
    async with daemon.client() as client:
        jobs = [await client.submit({"kind": "backup", "database": "slow"}) for _ in range(4)]
        for job in jobs[:3]:
            await wait_job(client, job["id"], frozenset({"running"}), min_bytes=1)
        assert (await client.job(jobs[3]["id"]))["state"] == "queued"
    daemon.send(signal.SIGTERM)
    assert daemon.wait(15) == 0
    rows = daemon.jobs_in_state_db()
    assert [r["state"] for r in rows] == ["aborted"] * 4
    assert all("SIGTERM" in r["error"] for r in rows), [r["error"] for r in rows]
    causes = [json.loads(r["result"])["aborted_by"] for r in rows[:3]]
    assert causes == ["shutdown"] * 3  # not "user": the metrics tell the two apart
    assert all(r["ended"] for r in rows)
    assert daemon.leftovers() == []
    names = [e["event"] for e in daemon.events()]
    assert "shutdown_started" in names
    assert "shutdown_complete" in names
    # By the daemon's own clock: every job ended within the grace period.
    assert not {"shutdown_grace_expired", "forced_exit"} & set(names)
    assert not daemon.socket.exists()


@pytest.mark.asyncio
async def test_sigterm_keeps_the_grace_period_even_when_jobs_do_not_stop(
    daemon_factory: Callable[..., Daemon],
) -> None:
    """1. Two backups whose producers ignore SIGTERM and stop writing (aborting one takes
       the engine's 5 s terminate grace), with grace_period = 2 s.
    2. SIGTERM: the process is gone within the grace period (plus process exit), and
       no producer is left behind.
    3. After a restart both jobs are ended (aborted, or failed as interrupted) and
       nothing of their backups is left."""
    daemon = daemon_factory(
        {"stubborn": {"url": slow_url(stubborn=True), "max_jobs": 2}},
        service={"max_jobs": 2, "grace_period": 2},
    ).start()
    async with daemon.client() as client:
        jobs = [await client.submit({"kind": "backup", "database": "stubborn"}) for _ in range(2)]
        for job in jobs:
            await wait_job(client, job["id"], frozenset({"running"}), min_bytes=1)
    daemon.send(signal.SIGTERM)
    daemon.wait(10)
    # The grace period ended the shutdown, not the jobs (each takes its producer's 5 s
    # terminate grace): the service's deadline or the exit timer fired, at 2 s.
    ends = {e["event"]: e for e in daemon.events()}
    assert (
        ends.get("shutdown_grace_expired", {}).get("grace_period") == 2
        or ends.get("forced_exit", {}).get("after_seconds") == 2
    ), list(ends)
    await wait_for(lambda: not _stubborn_processes(), timeout=5, what="no orphan producer")
    daemon.start()
    async with daemon.client() as client:
        for job in jobs:
            assert (await client.job(job["id"]))["state"] in ("aborted", "failed")
    await wait_for(lambda: daemon.leftovers() == [], timeout=10, what="an empty destination")
    assert daemon.stop() == 0


@pytest.mark.asyncio
async def test_kill_9_mid_job_then_restart_marks_it_failed_and_removes_its_files(
    daemon_factory: Callable[..., Daemon],
) -> None:
    """1. A slow backup runs; its temporaries are in the destination.
    2. kill -9: the files stay, the job is still "running" in the state database.
    3. Restart: the job is failed with the interrupted reason, its partial files are
       gone, and the record says what was removed."""
    daemon = daemon_factory({"slow": {"url": slow_url()}}).start()
    async with daemon.client() as client:
        job = await client.submit({"kind": "backup", "database": "slow"})
        running = await wait_job(client, job["id"], frozenset({"running"}), min_bytes=1)
    daemon.kill()
    partial = daemon.leftovers()
    assert any(name.endswith(".tmp") for name in partial), partial
    (row,) = daemon.jobs_in_state_db()
    assert row["state"] == "running"
    assert row["backup_id"] == running["backup_id"]

    daemon.start()
    async with daemon.client() as client:
        after = await client.job(job["id"])
        assert after["state"] == "failed"
        assert after["error"] == INTERRUPTED_REASON
        cleanup = after["result"]["cleanup"]
        assert cleanup["committed"] is False
        # every file under the backup's directory: its temporaries and its owner lock
        assert sorted(cleanup["removed"]) == sorted(p for p in partial if "/" in p)
        assert cleanup["failures"] == []
    assert daemon.leftovers() == []
    assert daemon.stop() == 0


@pytest.mark.asyncio
async def test_a_second_signal_forces_the_exit(daemon_factory: Callable[..., Daemon]) -> None:
    """1. A backup whose producer ignores SIGTERM and stops writing: aborting it takes
       the engine's 5 s terminate grace, so the first SIGTERM's shutdown is slow.
    2. Meanwhile submissions get 503 (shutting_down), readiness is 503, reading works.
    3. A second SIGTERM forces the exit: non-zero, within 3 s, no producer left behind.
    4. After a restart nothing of that backup is left."""
    daemon = daemon_factory(
        {"stubborn": {"url": slow_url(stubborn=True)}}, service={"grace_period": 30}
    ).start()
    async with daemon.client() as client:
        job = await client.submit({"kind": "backup", "database": "stubborn"})
        await wait_job(client, job["id"], frozenset({"running"}), min_bytes=1)
    daemon.send(signal.SIGTERM)
    await wait_for(
        lambda: any(e["event"] == "shutdown_started" for e in daemon.events()),
        what="the shutdown",
    )
    async with daemon.http() as http:
        async with http.post(
            "http://vdistream/v1/jobs", json={"kind": "backup", "database": "stubborn"}
        ) as refused:
            assert refused.status == 503
            assert (await refused.json())["error"]["code"] == "shutting_down"
        async with http.get("http://vdistream/v1/ready") as ready:
            assert ready.status == 503
            assert (await ready.json())["error"]["code"] == "not_ready"
        async with http.get(f"http://vdistream/v1/jobs/{job['id']}") as still:
            assert (await still.json())["state"] == "running"  # reading still works
    await anyio.sleep(0.5)
    assert daemon.proc is not None
    assert daemon.proc.poll() is None, "the first signal was expected to take longer"
    daemon.send(signal.SIGTERM)
    # Forced (exit 1, "shutdown_forced"), not the first shutdown ending after the
    # producer's 5 s terminate grace (exit 0).
    assert daemon.wait(10) == 1
    assert any(e["event"] == "shutdown_forced" for e in daemon.events())
    await wait_for(lambda: not _stubborn_processes(), timeout=5, what="no orphan producer")
    daemon.start()
    async with daemon.client() as client:
        after = await client.job(job["id"])
        assert after["state"] in ("aborted", "failed")
    await wait_for(lambda: daemon.leftovers() == [], timeout=10, what="an empty destination")
    assert daemon.stop() == 0


@pytest.mark.asyncio
async def test_sighup_reloads_the_settings_without_dropping_running_jobs(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    """1. A slow backup runs.
    2. The settings file gains a database; SIGHUP.
    3. The new database is served and can be backed up; the running job goes on."""
    daemon = daemon_factory({"slow": {"url": slow_url()}}).start()
    source = make_sqlite(tmp_path / "new.db")
    async with daemon.client() as client:
        job = await client.submit({"kind": "backup", "database": "slow"})
        await wait_job(client, job["id"], frozenset({"running"}), min_bytes=1)
        daemon.write_config(
            {
                "slow": {"url": slow_url()},
                "fresh": {"url": f"sqlite://{source}", "verify_after_backup": False},
            }
        )
        daemon.send(signal.SIGHUP)

        async def served() -> bool:
            return "fresh" in [d["name"] for d in await client.databases()]

        await wait_for(served, what="the new database after SIGHUP")
        fresh = await client.submit({"kind": "backup", "database": "fresh"})
        assert (await wait_job(client, fresh["id"]))["state"] == "succeeded"
        still = await client.job(job["id"])
        assert still["state"] == "running"
        await client.abort(job["id"])
        assert (await wait_job(client, job["id"]))["state"] == "aborted"
    assert any(e["event"] == "settings_reloaded" for e in daemon.events())
    assert daemon.stop() == 0


def _stubborn_processes() -> list[int]:
    """Pids of ``slow_source.py --stubborn`` processes still running."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and str(SLOW_SOURCE).encode() in argv and b"--stubborn" in argv:
            found.append(int(entry.name))
    return found


def _running(pid: int, start_time: int | None) -> bool:
    """``pid`` is still the process that started at ``start_time``, and not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X") and (
        process_start_time(pid) == start_time
    )


def _group_leader() -> subprocess.Popen[bytes]:
    """``sleep 1000`` leading a process group of its own, without a parent-death signal."""
    return subprocess.Popen(["sleep", "1000"], start_new_session=True)


async def _read_pid(path: Path) -> int:
    text = await wait_for(
        lambda: path.exists() and path.read_text().strip(), timeout=20, what=f"a pid in {path}"
    )
    return int(text)


@pytest.mark.asyncio
async def test_kill_9_of_the_daemon_leaves_no_child_and_the_restart_ends_what_survived(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    """1. A backup's producer runs and has started a grandchild of its own (``sleep``).
    2. kill -9 of the daemon: the producer dies with it (parent-death signal); the
       grandchild does not (the kernel signals direct children only), but the ledger
       in the state directory records the producer's process group.
    3. Two more entries are put in the ledger: a group of our own making (setsid, no
       parent-death signal, the right start time) and one whose pid now belongs to
       another process (another start time, no token).
    4. Restart: the grandchild and our group are ended (``orphan_ended``), the other
       process is not; the ledger is empty afterwards."""
    producer_pid, grandchild_pid = tmp_path / "producer.pid", tmp_path / "grandchild.pid"
    script = (
        f"sleep 1000 & echo $! > {grandchild_pid}; echo $$ > {producer_pid}; "
        f"exec {sys.executable} {SLOW_SOURCE} 200000000 2000000"
    )
    daemon = daemon_factory({"orphans": {"url": f"cmd:sh -c {shlex.quote(script)}"}}).start()
    ledger = ChildLedger(daemon.state / LEDGER_DIR)
    ours, stranger = _group_leader(), _group_leader()
    cleanup: list[int] = []
    try:
        async with daemon.client() as client:
            job = await client.submit({"kind": "backup", "database": "orphans"})
            await wait_job(client, job["id"], frozenset({"running"}), min_bytes=1)
        producer, grandchild = await _read_pid(producer_pid), await _read_pid(grandchild_pid)
        cleanup += [producer, grandchild]
        producer_start = process_start_time(producer)
        grandchild_start = process_start_time(grandchild)
        assert [entry["pgid"] for _, entry in ledger.entries() if entry] == [producer]

        daemon.kill()
        await wait_for(
            lambda: not _running(producer, producer_start), timeout=2, what="the producer gone"
        )
        assert _running(grandchild, grandchild_start)

        ours_start = process_start_time(ours.pid)
        stranger_start = process_start_time(stranger.pid)
        assert ours_start is not None
        assert stranger_start is not None
        ledger.record(ChildRecord(ours.pid, ours_start, "c" * 32, ("sleep", "1000")))
        ledger.record(ChildRecord(stranger.pid, stranger_start + 1, "d" * 32, ("sleep",)))

        daemon.start()
        assert not _running(grandchild, grandchild_start)
        assert ours.wait(5) == -signal.SIGTERM
        assert stranger.poll() is None
        assert ledger.entries() == []
        ended = [e for e in daemon.events() if e["event"] == "orphan_ended"]
        assert sorted(e["pgid"] for e in ended) == sorted([producer, ours.pid])
        assert daemon.stop() == 0
    finally:
        for proc in (ours, stranger):
            proc.kill()
            proc.wait()
        for pid in cleanup:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
