"""Schedules fire backups, verification follows, retention prunes, the last good backup
stays. ``VDISTREAM_SCHEDULE_SPEEDUP=60`` makes the schedules' minute last one second,
so ``* * * * *`` fires every second instead of every minute."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.daemon.conftest import Daemon, make_sqlite, wait_for

pytestmark = pytest.mark.timeout(90)


@pytest.mark.asyncio
async def test_a_schedule_fires_and_retention_keeps_the_last_good_backups(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    """1. ``* * * * *`` with keep_last = 2 and verify_after_backup.
    2. At least four scheduled backups are made and verified; retention deleted
       the older ones, manifest first, leaving no directory behind.
    3. The newest verified backup and the one before it are still there; /metrics
       says the last verified backup is seconds old."""
    source = make_sqlite(tmp_path / "app.db", rows=2_000)
    daemon = daemon_factory(
        {
            "app": {
                "url": f"sqlite://{source}",
                "schedule": "* * * * *",
                "retention": {"keep_last": 2},
            }
        },
        env={"VDISTREAM_SCHEDULE_SPEEDUP": "60"},
    ).start()
    async with daemon.client() as client:

        async def verified() -> list[dict[str, object]]:
            jobs = await client.jobs(kind="verify", state="succeeded")
            return jobs if len(jobs) >= 4 else []

        jobs = await wait_for(verified, timeout=40, what="four verified scheduled backups")
        metrics = await client.metrics()
    assert daemon.stop() == 0

    rows = daemon.jobs_in_state_db()
    backups = [r for r in rows if r["kind"] == "backup"]
    assert backups
    assert all(r["params"].count('"trigger":"schedule"') == 1 for r in backups)
    deleted = set()
    for job in jobs:
        deleted.update(job["result"]["retention"]["deleted"])
    assert deleted, "retention deleted nothing"
    present = {p.name for p in daemon.dest.iterdir()}
    assert not deleted & present
    assert not [name for name in present if name.startswith(".")]

    db = sqlite3.connect(daemon.state / "state.db")
    (anchor,) = db.execute("SELECT backup_id FROM last_verified WHERE database = 'app'").fetchone()
    db.close()
    assert (daemon.dest / anchor / "manifest.json").is_file()
    good = [r["backup_id"] for r in rows if r["kind"] == "verify" and r["state"] == "succeeded"]
    newest_two = sorted(good)[-2:]
    assert all((daemon.dest / b / "manifest.json").is_file() for b in newest_two)
    assert len([n for n in present if (daemon.dest / n / "manifest.json").exists()]) <= 4
    line = next(
        x for x in metrics.splitlines() if x.startswith("vdistream_seconds_since_last_verified")
    )
    assert float(line.rsplit(" ", 1)[1]) < 30
    assert "vdistream_retention_deleted_backups_total" in metrics
