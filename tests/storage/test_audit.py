"""``storage audit`` on file storage: empty backup directories, live jobs' work, stale
locks, and ``AuditReport.debris_left`` (what the command line's exit code follows)."""

from __future__ import annotations

import datetime
import os
import subprocess
from pathlib import Path

import pytest

from tests.storage.conftest import kill_9, start_writer
from tests.storage.test_file import files_under
from vdistream.catalog.audit import audit
from vdistream.ownership import LOCK_NAME
from vdistream.storage import FileStorage

pytestmark = pytest.mark.asyncio


async def test_clean_removes_the_directories_it_empties_and_empty_ones(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "dest")
    await storage.write_bytes("b1/stream-01-of-02.vdi", b"orphan")
    await storage.write_bytes("b1/sub/stream-02-of-02.vdi", b"orphan")
    (storage.path / "b2" / "deeper").mkdir(parents=True)  # an empty backup directory
    report = await audit(storage)
    assert report.empty_directories == ("b2/deeper", "b2")
    assert report.debris_left

    cleaned = await audit(storage, clean=True)

    assert sorted(cleaned.removed_objects) == [
        "b1/stream-01-of-02.vdi",
        "b1/sub/stream-02-of-02.vdi",
    ]
    assert sorted(cleaned.removed_directories) == ["b1", "b1/sub", "b2", "b2/deeper"]
    assert not cleaned.debris_left
    assert cleaned.clean
    assert list(storage.path.iterdir()) == []
    assert not (await audit(storage)).debris_left


async def test_min_age_keeps_young_empty_directories_but_not_the_ones_it_empties(
    tmp_path: Path,
) -> None:
    storage = FileStorage(tmp_path / "dest")
    (storage.path / "young").mkdir(parents=True)
    await storage.write_bytes("old/stream", b"orphan")
    stamp = datetime.datetime(2020, 1, 1).timestamp()
    os.utime(storage.path / "old" / "stream", (stamp, stamp))
    cleaned = await audit(storage, clean=True, min_age=datetime.timedelta(hours=1))
    assert cleaned.removed_objects == ("old/stream",)
    assert cleaned.removed_directories == ("old",)
    assert "young/" in cleaned.too_young
    assert (storage.path / "young").is_dir()
    assert not cleaned.debris_left  # too young is no debris left: a live job may own it


async def test_live_jobs_are_skipped_and_stale_locks_removed(
    tmp_path: Path, writers: list[subprocess.Popen[str]]
) -> None:
    dest = tmp_path / "dest"
    start_writer(writers, dest, "live", "live/stream-02-of-02.vdi")
    kill_9(start_writer(writers, dest, "dead", "dead/stream-02-of-02.vdi"))
    storage = FileStorage(dest)

    report = await audit(storage)

    assert report.in_progress == ("live",)
    assert report.orphan_objects == ("dead/stream-02-of-02.vdi",)
    assert f"dead/{LOCK_NAME}" in report.temporaries
    assert any(name.startswith("dead/.stream-01-of-02.vdi.") for name in report.temporaries)
    assert not any(name.startswith("live/") for name in report.temporaries)
    assert report.debris_left

    cleaned = await audit(storage, clean=True)
    assert cleaned.failures == ()
    assert "dead" in cleaned.removed_directories
    assert not (dest / "dead").exists()
    assert f"live/{LOCK_NAME}" in files_under(dest)
    assert "live/stream-02-of-02.vdi" in files_under(dest)
    assert not cleaned.debris_left


async def test_debris_left_after_a_failed_clean(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "dest")
    await storage.write_bytes("b1/stream", b"orphan")
    if os.geteuid() == 0:
        pytest.skip("root removes files from read-only directories")
    (storage.path / "b1").chmod(0o500)
    try:
        cleaned = await audit(storage, clean=True)
    finally:
        (storage.path / "b1").chmod(0o700)
    assert cleaned.failures
    assert cleaned.debris_left
