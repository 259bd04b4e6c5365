"""File storage: the debris of killed backups (``in_progress`` locks and ``sweep``), and
``probe``. Real processes hold the locks; ``kill -9`` ends them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.storage.conftest import kill_9, start_writer
from tests.storage.test_file import files_under
from vdistream.ownership import LOCK_NAME
from vdistream.storage import BackupInProgressError, FileStorage, StorageProbeError

pytestmark = pytest.mark.asyncio


async def test_a_killed_backup_is_swept_and_a_live_one_kept(
    tmp_path: Path, writers: list[subprocess.Popen[str]]
) -> None:
    dest = tmp_path / "dest"
    storage = FileStorage(dest)
    dead = start_writer(writers, dest, "dead", "dead/stream-02-of-02.vdi")
    live = start_writer(writers, dest, "live")
    kill_9(dead)
    before = files_under(dest)
    temps = [name for name in before if name.startswith("dead/.stream-01-of-02.vdi.")]
    assert len(temps) == 1
    assert temps[0].endswith(".tmp")
    assert f"dead/{LOCK_NAME}" in before

    removed = await storage.sweep()

    assert sorted(removed) == sorted([temps[0], "dead/stream-02-of-02.vdi", f"dead/{LOCK_NAME}"])
    assert not (dest / "dead").exists()
    left = files_under(dest)
    assert f"live/{LOCK_NAME}" in left
    assert any(name.startswith("live/.stream-01-of-02.vdi.") for name in left)
    assert await storage.sweep() == []  # the live one is never touched

    with pytest.raises(
        BackupInProgressError, match=rf"backup live is being written .*pid {live.pid}"
    ):
        async with storage.in_progress("live"):
            pass

    kill_9(live)
    assert sorted(await storage.sweep()) == sorted(left)
    assert files_under(dest) == []
    assert list(dest.iterdir()) == []


async def test_a_committed_backup_keeps_its_streams(
    tmp_path: Path, writers: list[subprocess.Popen[str]]
) -> None:
    """A job that reused the id of a committed backup and was killed: only its own
    temporary and lock go."""
    dest = tmp_path / "dest"
    committed = ["b1/stream-02-of-02.vdi", "b1/manifest.json"]
    kill_9(start_writer(writers, dest, "b1", *committed))
    storage = FileStorage(dest)
    removed = await storage.sweep()
    assert len(removed) == 2
    assert f"b1/{LOCK_NAME}" in removed
    assert files_under(dest) == sorted(committed)


async def test_a_directory_without_a_lock_is_left_to_the_audit(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "dest")
    await storage.write_bytes("old/stream-01-of-01.vdi", b"from an older version")
    temp = await storage.open_sink("old/stream-02-of-02.vdi")
    await temp.write(memoryview(b"x"))
    assert await storage.sweep() == []
    assert len(files_under(storage.path)) == 2
    await temp.abort()


async def test_in_progress_cleans_up_after_itself(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "dest")
    async with storage.in_progress("b1"):
        assert (storage.path / "b1" / LOCK_NAME).is_file()
        assert await storage.list() == []  # the lock is no object
        sink = await storage.open_sink("b1/stream-01-of-01.vdi")
        await sink.write(memoryview(b"data"))
        await sink.abort()  # a failed backup
    assert list(storage.path.iterdir()) == []  # lock and empty directory gone
    async with storage.in_progress("b2"):
        await storage.write_bytes("b2/manifest.json", b"{}")
    assert files_under(storage.path) == ["b2/manifest.json"]
    with pytest.raises(Exception, match="invalid backup id"):
        async with storage.in_progress("a/b"):
            pass


async def test_in_progress_is_exclusive_within_a_process_too(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "dest")
    async with storage.in_progress("b1"):
        with pytest.raises(BackupInProgressError, match=f"pid {os.getpid()}"):
            async with FileStorage(tmp_path / "dest").in_progress("b1"):
                pass
        assert await storage.sweep() == []
    async with storage.in_progress("b1"):  # free again
        pass


async def test_abort_removes_the_directories_open_created(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "dest")
    await storage.write_bytes("kept/x", b"1")
    sink = await storage.open_sink("kept/new/deeper/key")
    await sink.abort()
    assert sorted(p.relative_to(storage.path).as_posix() for p in storage.path.rglob("*")) == [
        "kept",
        "kept/x",
    ]


async def test_probe_creates_the_directory_and_leaves_nothing(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "new" / "dest")
    await storage.probe()
    assert storage.path.is_dir()
    assert list(storage.path.iterdir()) == []


async def test_probe_errors_name_the_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"in the way")
    storage = FileStorage(tmp_path / "file" / "dest")
    with pytest.raises(StorageProbeError) as caught:
        await storage.probe()
    assert str(caught.value) == f"{storage.path}: not a directory (a file is in the way)"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
async def test_probe_permission_denied(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(StorageProbeError, match=rf"^{locked}: permission denied$"):
            await FileStorage(locked).probe()
    finally:
        locked.chmod(0o700)


async def test_probe_of_a_read_only_directory_as_root(tmp_path: Path) -> None:
    """Root ignores modes, so the error that remains for it is a file in the way of
    the directory itself."""
    (tmp_path / "dest").write_bytes(b"")
    with pytest.raises(StorageProbeError, match=r"dest: not a directory"):
        await FileStorage(tmp_path / "dest").probe()
