"""A mirrored backup of the daemon killed with ``kill -9``: the restart marks the job
failed and removes what it left in the mirror as in the destination."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.daemon.conftest import Daemon, slow_url, wait_for, wait_job
from tests.daemon.conftest import daemon_factory as daemon_factory  # the fixture
from vdistream.service import INTERRUPTED_REASON


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
