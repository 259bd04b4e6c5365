"""The daemon's ``mirror = "NAME"`` (``[databases.X]``): every backup of the database
goes to its destination and to the mirror destination in one pass, the job's result
names both manifests, and the mirror alone restores it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import anyio
import pytest

from tests.daemon.conftest import make_sqlite
from tests.storage.test_file import files_under
from vdistream.operations import run_restore
from vdistream.service import Service
from vdistream.service.settings import Settings, load_settings

pytestmark = pytest.mark.asyncio


def _mirrored(tmp_path: Path, source: Path, *lines: str) -> Settings:
    """Settings of one database ``app`` backed up to ``local`` and mirrored to
    ``offsite`` (under ``tmp_path``), with ``lines`` added to its table."""
    config = tmp_path / "vdistream.toml"
    config.write_text(
        "\n".join(
            [
                "[service]",
                f'state_dir = "{tmp_path / "state"}"',
                'timezone = "UTC"',
                "[destinations.local]",
                f'url = "{tmp_path / "local"}"',
                "[destinations.offsite]",
                f'url = "{tmp_path / "offsite"}"',
                "[databases.app]",
                f'url = "sqlite://{source}"',
                'destination = "local"',
                'mirror = "offsite"',
                *lines,
            ]
        )
        + "\n"
    )
    return load_settings(config, env={})


async def test_a_database_with_a_mirror_is_backed_up_to_both(tmp_path: Path) -> None:
    source = make_sqlite(tmp_path / "app.db", rows=2_000)
    local, offsite = tmp_path / "local", tmp_path / "offsite"
    settings = _mirrored(tmp_path, source, "devices = 2")
    async with Service(settings, api=False) as service:
        record = await service.submit("backup", "app", verify=False)
        done = await service.wait(record.id)
        await service.shutdown()
    assert done.state.value == "succeeded", done.error
    backup_id = done.backup_id
    assert backup_id is not None
    assert done.result is not None
    assert done.result["mirror"] == "offsite"
    assert done.result["manifest"] == (local / backup_id / "manifest.json").as_uri()
    assert done.result["mirror_manifest"] == (offsite / backup_id / "manifest.json").as_uri()
    assert files_under(local) == files_under(offsite)
    assert f"{backup_id}/manifest.json" in files_under(offsite)

    restored = tmp_path / "restored.db"
    result = await run_restore(f"{offsite}/{backup_id}", f"sqlite://{restored}")
    assert result.ok, result.error
    with sqlite3.connect(restored) as db, sqlite3.connect(source) as original:
        query = "SELECT id, name FROM items ORDER BY id"
        assert db.execute(query).fetchall() == original.execute(query).fetchall()


async def test_retention_prunes_the_mirror_as_it_prunes_the_destination(tmp_path: Path) -> None:
    """The mirror holds the same backups: what retention deletes from the destination
    goes from the mirror too, or the mirror would only grow."""
    source = make_sqlite(tmp_path / "app.db", rows=500)
    local, offsite = tmp_path / "local", tmp_path / "offsite"
    settings = _mirrored(tmp_path, source, "devices = 1", "retention = { keep_last = 1 }")
    made = []
    async with Service(settings, api=False) as service:
        for _ in range(3):
            await anyio.sleep(1.1)  # backups that end in the same second are kept together
            record = await service.submit("backup", "app", verify=False)
            done = await service.wait(record.id)
            assert done.state.value == "succeeded", done.error
            made.append(done.backup_id)
            check = await service.submit("verify", "app", backup_id=done.backup_id)
            verified = await service.wait(check.id)
            assert verified.state.value == "succeeded", verified.error
        await service.shutdown()
    assert verified.result is not None
    # the second verification deleted the first backup, the third the second
    assert verified.result["retention"]["deleted"] == [made[1]]
    assert verified.result["retention"]["mirror_deleted"] == [made[1]]
    newest = made[-1]
    for place in (local, offsite):
        backups = sorted({name.split("/")[0] for name in files_under(place)})
        assert backups == [newest], place
