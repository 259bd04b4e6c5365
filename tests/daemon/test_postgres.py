"""The daemon backs up, verifies and restores a real PostgreSQL database."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.daemon.conftest import Daemon, wait_for, wait_job
from tests.databases.pgserver import PgServer

pytestmark = pytest.mark.timeout(120)


@pytest.mark.asyncio
async def test_postgres_dump_backup_verify_and_restore(
    daemon_factory: Callable[..., Daemon], daemon_pg: PgServer
) -> None:
    """1. A database ``app`` of a PostgreSQL 15 server, mode dump, two devices.
    2. A backup through the socket succeeds and its verification (pg_restore --list
       and a full read of the archive) follows and succeeds.
    3. A restore with ``create`` into a new database gives back every row."""
    daemon = daemon_factory({"pg": {"url": daemon_pg.url("app"), "mode": "dump"}}).start()
    async with daemon.client() as client:
        job = await client.submit({"kind": "backup", "database": "pg"})
        done = await wait_job(client, job["id"], timeout=60)
        assert done["state"] == "succeeded", done["error"]
        assert done["result"]["bytes"] > 0

        async def verified() -> list[dict[str, object]]:
            return await client.jobs(kind="verify", state="succeeded")

        (verify,) = await wait_for(verified, timeout=60, what="the verification")
        assert verify["backup_id"] == done["backup_id"]
        checks = {c["name"]: c for c in verify["result"]["checks"]}
        assert checks["content"]["ok"]

        restore = await client.submit(
            {
                "kind": "restore",
                "database": "pg",
                "backup_id": done["backup_id"],
                "target": daemon_pg.url("app_restored"),
                "create": True,
            }
        )
        restored = await wait_job(client, restore["id"], timeout=60)
        assert restored["state"] == "succeeded", restored["error"]
    assert daemon_pg.psql("SELECT count(*) FROM items", "app_restored") == "20000"
    assert daemon.stop() == 0


@pytest.mark.asyncio
async def test_postgres_files_mode_backup_verify_and_restore(
    daemon_factory: Callable[..., Daemon], daemon_pg: PgServer, tmp_path: Path
) -> None:
    """``mode = "files"``: the daemon reads the data directory itself; the backup is
    verified (every file's CRC-32, pg_controldata) and restores into an empty directory
    that holds the table's files, the backup label and pg_control."""
    daemon = daemon_factory({"pgf": {"url": daemon_pg.url("app"), "mode": "files"}}).start()
    target = tmp_path / "restored"
    async with daemon.client() as client:
        job = await client.submit({"kind": "backup", "database": "pgf"})
        done = await wait_job(client, job["id"], timeout=60)
        assert done["state"] == "succeeded", done["error"]

        async def verified() -> list[dict[str, object]]:
            return await client.jobs(kind="verify", state="succeeded")

        (verify,) = await wait_for(verified, timeout=60, what="the verification")
        checks = {c["name"]: c for c in verify["result"]["checks"]}
        assert checks["content"]["ok"], checks
        assert "pg_controldata" in checks["content"]["detail"]

        restore = await client.submit(
            {
                "kind": "restore",
                "database": "pgf",
                "backup_id": done["backup_id"],
                "target": str(target),
            }
        )
        restored = await wait_job(client, restore["id"], timeout=60)
        assert restored["state"] == "succeeded", restored["error"]
    assert (target / "global" / "pg_control").stat().st_size == 8192
    assert "START WAL LOCATION" in (target / "backup_label").read_text()
    # no slot and no backup left behind on the server
    assert daemon_pg.psql("SELECT count(*) FROM pg_replication_slots") == "0"
    assert daemon.stop() == 0
