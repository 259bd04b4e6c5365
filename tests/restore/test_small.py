"""Smaller restore promises: the restored file's mode follows the source's within the
umask, a key given for an unencrypted backup is refused, partial files of killed
restores are removed (and a live restore's never)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.restore.conftest import backup_database, make_database, rows_of
from vdistream.engines.files import PARTIAL_SUFFIX
from vdistream.errors import KeyNotNeededError
from vdistream.operations import KeySource, run_restore, run_verify

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def backup(tmp_path: Path) -> Path:
    dest = tmp_path / "dest"
    await backup_database(make_database(tmp_path / "source.db"), dest)
    return dest


@pytest.fixture
def umask() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
async def test_the_restored_file_gets_the_usual_mode(
    tmp_path: Path, backup: Path, umask: None, mask: int, mode: int
) -> None:
    os.umask(mask)
    target = tmp_path / "restored.db"
    result = await run_restore(f"{backup}/b", str(target))
    assert result.ok, result.error
    assert stat.S_IMODE(target.stat().st_mode) == mode


@pytest.mark.parametrize("source_mode", [0o600, 0o640, 0o644])
async def test_the_restored_file_follows_the_source_within_the_umask(
    tmp_path: Path, umask: None, source_mode: int
) -> None:
    source = make_database(tmp_path / "secret.db")
    source.chmod(source_mode)
    dest = tmp_path / "dest"
    await backup_database(source, dest)
    os.umask(0o022)
    target = tmp_path / "restored.db"
    result = await run_restore(f"{dest}/b", str(target))
    assert result.ok, result.error
    assert stat.S_IMODE(target.stat().st_mode) == source_mode  # never looser than it was
    os.umask(0o077)
    narrow = tmp_path / "narrow.db"
    assert (await run_restore(f"{dest}/b", str(narrow))).ok
    assert stat.S_IMODE(narrow.stat().st_mode) == 0o600


async def test_a_key_for_an_unencrypted_backup_is_refused(
    tmp_path: Path, backup: Path, key_file: Path
) -> None:
    target = tmp_path / "restored.db"
    keys = KeySource(key_file=str(key_file))
    refused = "^backup b is not encrypted: leave out --encrypt-key-file$"
    with pytest.raises(KeyNotNeededError, match=refused):
        await run_restore(f"{backup}/b", str(target), keys=keys)
    assert not target.exists()
    report = await run_verify(f"{backup}/b", keys=keys)
    assert not report.ok
    assert [c.name for c in report.checks if not c.ok] == ["key"]
    # A key configured for every job (the daemon's) is used only where needed.
    optional = KeySource(key_file=str(key_file), optional=True)
    result = await run_restore(f"{backup}/b", str(target), keys=optional)
    assert result.ok, result.error


def _hold_lock(path: Path) -> subprocess.Popen[str]:
    """Another process that created ``path`` and holds its lock, as a restore does."""
    code = (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "time.sleep(120)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "locked"
    return process


async def test_partial_files_of_killed_restores_are_removed_and_live_ones_kept(
    tmp_path: Path, backup: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    target = out / "restored.db"
    dead = out / f".restored.db.dead1234{PARTIAL_SUFFIX}"
    dead.write_bytes(b"half a database")  # nobody holds it: its restore was killed
    live = out / f".restored.db.live5678{PARTIAL_SUFFIX}"
    holder = _hold_lock(live)
    try:
        result = await run_restore(f"{backup}/b", str(target))
        assert result.ok, result.error
        assert rows_of(target) == 3000
        assert not dead.exists()
        assert live.exists()  # a live restore's partial file is never touched

        holder.kill()  # kill -9: the kernel drops its lock
        holder.wait()
        again = out / "again.db"
        live_again = out / f".again.db.killed00{PARTIAL_SUFFIX}"
        live.rename(live_again)  # the same dead file, beside another target
        result = await run_restore(f"{backup}/b", str(again))
        assert result.ok, result.error
        assert sorted(p.name for p in out.iterdir()) == ["again.db", "restored.db"]
    finally:
        holder.kill()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()


async def test_a_restore_holds_the_lock_on_its_partial_file(tmp_path: Path, backup: Path) -> None:
    """While a restore writes its partial file, it holds its lock (so no sweep removes
    it): checked from another process during the restore."""
    import fcntl

    import anyio

    from vdistream.coordinator import Job

    target = tmp_path / "restored.db"
    seen: list[bool] = []

    def probe_lock() -> None:
        for partial in tmp_path.glob(f".restored.db.*{PARTIAL_SUFFIX}"):
            try:
                fd = os.open(partial, os.O_RDONLY)
            except FileNotFoundError:  # renamed into place since the glob: nothing to see
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                seen.append(True)
            else:
                seen.append(False)
            finally:
                os.close(fd)

    async def watch(job: Job) -> None:
        while not job.progress.finished:
            probe_lock()
            await anyio.sleep(0.001)

    async with anyio.create_task_group() as tg:

        def hook(job: Job) -> None:
            tg.start_soon(watch, job)

        result = await run_restore(f"{backup}/b", str(target), on_job=hook)
    assert result.ok, result.error
    assert seen
    assert all(seen)
