"""Before a backup's engine starts: debris swept, the destination probed, the id free;
the backup runs inside the storage's in-progress marker; restores sweep too.

A duplicate ``--id`` and an unusable destination are found before the producer runs
(its marker file never appears), with one line naming the backup and the destination.
Debris of a backup whose process died (its lock released by the kernel) is removed by
the next backup or restore from that destination.
"""

from __future__ import annotations

import builtins
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from vdistream.catalog import CatalogError
from vdistream.errors import StorageError
from vdistream.operations import BackupSettings, run_backup, run_restore
from vdistream.storage import MemoryStorage, Sink

pytestmark = pytest.mark.asyncio

SMALL = {"block_size": 4096, "max_transfer_size": 65536}


def producer(tmp_path: Path) -> tuple[str, Path]:
    """A ``cmd:`` source that leaves a marker when it runs, and its marker."""
    marker = tmp_path / "producer-ran"
    return f"cmd:sh -c 'touch {marker}; head -c 200000 /dev/urandom'", marker


def settings(backup_id: str | None = "b") -> BackupSettings:
    return BackupSettings(devices=2, backup_id=backup_id, **SMALL)


async def test_a_duplicate_id_is_refused_before_the_engine_starts(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    first = await run_backup("cmd:head -c 1000 /dev/urandom", str(dest), settings())
    assert first.ok, first.result.error
    before = sorted(p.relative_to(dest) for p in dest.rglob("*"))
    source, marker = producer(tmp_path)
    with pytest.raises(CatalogError) as raised:
        await run_backup(source, str(dest), settings())
    assert str(raised.value) == f"backup b already exists in {dest.as_uri()}"
    assert not marker.exists()  # the producer never ran
    assert sorted(p.relative_to(dest) for p in dest.rglob("*")) == before


async def test_an_unwritable_destination_is_refused_before_the_engine_starts(
    tmp_path: Path,
) -> None:
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("not a directory")
    source, marker = producer(tmp_path)
    with pytest.raises(StorageError, match="not a directory") as raised:
        await run_backup(source, str(in_the_way / "dest"), settings())
    assert str(in_the_way) in str(raised.value)
    assert "\n" not in str(raised.value)
    assert not marker.exists()


class RecordingStorage(MemoryStorage):
    """A memory storage that records the debris and preflight calls, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.events: builtins.list[str] = []

    async def sweep(self) -> builtins.list[str]:
        self.events.append("sweep")
        return []

    async def probe(self) -> None:
        self.events.append("probe")

    @contextlib.asynccontextmanager
    async def _marked(self, backup_id: str) -> AsyncIterator[None]:
        self.events.append(f"enter {backup_id}")
        try:
            yield
        finally:
            self.events.append(f"exit {backup_id}")

    def in_progress(self, backup_id: str) -> contextlib.AbstractAsyncContextManager[None]:
        return self._marked(backup_id)

    async def open_sink(self, key: str, *, device: str | None = None) -> Sink:
        self.events.append(f"sink {key.rpartition('/')[2]}")
        return await super().open_sink(key, device=device)


@pytest.mark.parametrize("backup_id", ["b", None])
async def test_the_backup_runs_inside_its_in_progress_marker(backup_id: str | None) -> None:
    storage = RecordingStorage()
    outcome = await run_backup("cmd:head -c 100000 /dev/urandom", storage, settings(backup_id))
    assert outcome.ok, outcome.result.error
    chosen = outcome.result.backup_id
    if backup_id is not None:
        assert chosen == backup_id
    events = storage.events
    assert events[:3] == ["sweep", "probe", f"enter {chosen}"]  # id decided beforehand
    assert sorted(events[3:5]) == ["sink stream-00-of-02.vdi", "sink stream-01-of-02.vdi"]
    assert events[5:] == ["sink manifest.json", f"exit {chosen}"]


async def test_a_failed_backup_leaves_its_marker_with_nothing_left() -> None:
    storage = RecordingStorage()
    outcome = await run_backup(
        "cmd:sh -c 'head -c 100000 /dev/urandom; exit 3'", storage, settings()
    )
    assert not outcome.ok
    assert storage.events[-1] == "exit b"
    assert await storage.list() == []


def _die_holding_a_backup(dest: Path, backup_id: str) -> None:
    """A process that marks ``backup_id`` in ``dest`` as in progress, writes a stream
    and dies without cleaning up (as ``kill -9`` leaves it)."""
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from vdistream.ownership import LOCK_NAME, OwnerLock\n"
        "directory = Path(sys.argv[1]) / sys.argv[2]\n"
        "directory.mkdir(parents=True)\n"
        "lock = OwnerLock.acquire(directory / LOCK_NAME)\n"
        "(directory / 'stream-00-of-01.vdi').write_bytes(os.urandom(1000))\n"
        "os._exit(9)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(dest), backup_id], check=False)
    assert done.returncode == 9
    assert (dest / backup_id / "stream-00-of-01.vdi").exists()


async def test_backup_and_restore_sweep_the_debris_of_dead_backups(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    _die_holding_a_backup(dest, "killed-1")
    outcome = await run_backup("cmd:head -c 1000 /dev/urandom", str(dest), settings())
    assert outcome.ok, outcome.result.error
    assert not (dest / "killed-1").exists()

    _die_holding_a_backup(dest, "killed-2")
    result = await run_restore(f"{dest}/b", "null:")
    assert result.ok, result.error
    assert not (dest / "killed-2").exists()
    assert (dest / "b" / "manifest.json").exists()
