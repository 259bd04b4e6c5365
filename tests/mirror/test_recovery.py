"""A mirrored backup of the daemon killed with ``kill -9``: the restart marks the job
failed and removes what it left in the mirror as in the destination."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.daemon.conftest import Daemon, make_sqlite, slow_url, wait_for, wait_job
from tests.daemon.conftest import daemon_factory as daemon_factory  # the fixture
from vdistream.operations import BackupSettings, run_backup
from vdistream.service import INTERRUPTED_REASON
from vdistream.service.recovery import _remove_partial_backup
from vdistream.service.settings import load_settings
from vdistream.service.state import JobRecord, JobType


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


@pytest.mark.asyncio
async def test_kill_9_of_a_mirrored_backup_then_restart_cleans_both(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    offsite = tmp_path / "offsite"
    daemon = daemon_factory({"slow": {"url": slow_url(), "mirror": "offsite"}})
    with daemon.config.open("a") as config:
        config.write(f'\n[destinations.offsite]\nurl = "{offsite}"\n')
    daemon.start()
    async with daemon.client() as client:
        job = await client.submit({"kind": "backup", "database": "slow"})
        await wait_job(client, job["id"], frozenset({"running"}), min_bytes=1)
    daemon.kill()
    left_in_mirror = _files(offsite)
    assert any(name.endswith(".tmp") for name in left_in_mirror), left_in_mirror

    daemon.start()
    async with daemon.client() as client:
        after = await client.job(job["id"])
        assert after["state"] == "failed"
        assert after["error"] == INTERRUPTED_REASON
        mirror = after["result"]["cleanup"]["mirror"]
        assert mirror["committed"] is False
        assert sorted(mirror["removed"]) == sorted(p for p in left_in_mirror if "/" in p)
    await wait_for(lambda: daemon.leftovers() == [], timeout=10, what="an empty destination")
    assert [p for p in _files(offsite) if not p.startswith(".vdistream-probe")] == []
    assert daemon.stop() == 0


@pytest.mark.asyncio
async def test_a_backup_complete_in_one_place_only_is_rolled_back(tmp_path: Path) -> None:
    """Killed between its two manifests (played: the mirror's manifest removed), a
    mirrored backup is complete in the destination only: the restart deletes it there
    too, as SQL Server's MIRROR TO rule says, and the mirror's streams go as debris."""
    source = make_sqlite(tmp_path / "app.db", rows=500)
    local, offsite = tmp_path / "local", tmp_path / "offsite"
    config = tmp_path / "vdistream.toml"
    config.write_text(
        f'[service]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[destinations.local]\nurl = "{local}"\n[destinations.offsite]\nurl = "{offsite}"\n'
        f'[databases.app]\nurl = "sqlite://{source}"\ndestination = "local"\n'
        'mirror = "offsite"\n'
    )
    settings = load_settings(config, env={})
    outcome = await run_backup(
        f"sqlite://{source}", str(local), BackupSettings(devices=2, mirror=str(offsite))
    )
    assert outcome.ok, outcome.result.error
    backup_id = outcome.result.backup_id
    (offsite / backup_id / "manifest.json").unlink()
    record = JobRecord.new(
        JobType.BACKUP,
        "app",
        backup_id=backup_id,
        storage_url=settings.destinations["local"].display_url,
        params={"destination": "local"},
        result={"mirror": "offsite"},
    )
    cleanup = await _remove_partial_backup(record, settings, datetime.now(UTC))
    assert cleanup is not None
    assert cleanup["committed"] is False
    assert cleanup["rolled_back"] is True
    assert cleanup["mirror"]["committed"] is False
    assert _files(local) == []
    assert _files(offsite) == []
