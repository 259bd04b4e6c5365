"""What a failed job leaves behind: nothing of its own.

The tar extraction behind base-backup restores (``TarExtractConsumer``) leaves the
target as it found it; SQLite's snapshot directory disappears however the job ends.
"""

from __future__ import annotations

import io
import stat
import tarfile
from pathlib import Path

import anyio
import pytest

import vdistream
from tests.databases.conftest import OPTIONS, tree
from tests.databases.test_command import make_tree
from tests.databases.test_sqlite import make_database
from vdistream.engines import (
    EndpointError,
    FailPoint,
    InjectedFaultError,
    Phase,
    ScopedRestore,
    TargetExistsError,
    ToolFailedError,
    resolve_source,
    restore_engine,
)
from vdistream.engines.sqlite import SQLiteBackup
from vdistream.engines.tarstream import TarExtractConsumer

pytestmark = pytest.mark.asyncio

JOB = vdistream.JobOptions(devices=4)


async def backup_command(command: str, store: Path, backup_id: str) -> None:
    engine = resolve_source(f"cmd:{command}").backup_engine(OPTIONS)
    result = await vdistream.backup(engine, str(store), backup_id=backup_id, options=JOB)
    assert result.ok, result.error


async def restore_tar(
    store: Path, backup_id: str, target: Path, *, fail_at: FailPoint | None = None
) -> vdistream.JobResult:
    engine = ScopedRestore(TarExtractConsumer(target), OPTIONS, fail_at=fail_at)
    return await vdistream.restore(engine, str(store), backup_id, options=JOB)


def evil_tar(path: Path) -> None:
    """A tar whose second member climbs out of the target."""
    with tarfile.open(path, "w") as archive:
        for name in ("fine.txt", "../escaped.txt"):
            info = tarfile.TarInfo(name)
            info.size = 5
            archive.addfile(info, io.BytesIO(b"hello"))


async def test_tar_stream_extracted_with_python_tarfile(tmp_path: Path) -> None:
    source = tmp_path / "source"
    make_tree(source)
    await backup_command(f"tar -C {source} -cf - .", tmp_path / "store", "t")
    target = tmp_path / "new" / "place"
    result = await restore_tar(tmp_path / "store", "t", target)
    assert result.ok, result.error
    assert tree(target) == tree(source)
    assert stat.S_IMODE(target.stat().st_mode) == 0o700


async def test_non_empty_target_refused_before_anything_flows(tmp_path: Path) -> None:
    source = tmp_path / "source"
    make_tree(source)
    await backup_command(f"tar -C {source} -cf - .", tmp_path / "store", "t")
    target = tmp_path / "busy"
    target.mkdir()
    (target / "mine").write_text("keep")
    result = await restore_tar(tmp_path / "store", "t", target)
    assert isinstance(result.error, TargetExistsError)
    assert str(target) in str(result.error)
    assert [p.name for p in target.iterdir()] == ["mine"]


async def test_a_stream_that_is_no_tar_leaves_nothing(tmp_path: Path) -> None:
    await backup_command("head -c 2000000 /dev/urandom", tmp_path / "store", "junk")
    created = tmp_path / "created"
    result = await restore_tar(tmp_path / "store", "junk", created)
    assert isinstance(result.error, EndpointError)
    assert f"extracting the tar stream into {created} failed" in str(result.error)
    assert not created.exists()  # we made it, we removed it

    existing = tmp_path / "existing"
    existing.mkdir()
    result = await restore_tar(tmp_path / "store", "junk", existing)
    assert not result.ok
    assert existing.is_dir()
    assert list(existing.iterdir()) == []


async def test_an_abort_mid_stream_empties_the_target_again(tmp_path: Path) -> None:
    source = tmp_path / "source"
    make_tree(source)
    await backup_command(f"tar -C {source} -cf - .", tmp_path / "store", "t")
    target = tmp_path / "target"
    target.mkdir()
    fault = FailPoint(Phase.MID_STREAM, after_bytes=2_000_000)
    result = await restore_tar(tmp_path / "store", "t", target, fail_at=fault)
    assert isinstance(result.error, InjectedFaultError)
    assert list(target.iterdir()) == []


async def test_members_outside_the_target_are_refused(tmp_path: Path) -> None:
    evil_tar(tmp_path / "evil.tar")
    await backup_command(f"cat {tmp_path}/evil.tar", tmp_path / "store", "evil")
    target = tmp_path / "sandbox" / "target"
    result = await restore_tar(tmp_path / "store", "evil", target)
    assert isinstance(result.error, EndpointError)
    assert "OutsideDestinationError" in str(result.error)
    assert not (tmp_path / "sandbox" / "escaped.txt").exists()
    assert not target.exists()


async def test_a_base_backup_restore_that_fails_verification_is_removed(tmp_path: Path) -> None:
    # A perfectly good tar, but not a base backup: pg_verifybackup says so.
    source = tmp_path / "source"
    make_tree(source)
    await backup_command(f"tar -C {source} -cf - .", tmp_path / "store", "t")
    target = tmp_path / "pgdata"
    engine = restore_engine("postgresql", "basebackup", str(target), OPTIONS)
    result = await vdistream.restore(engine, str(tmp_path / "store"), "t", options=JOB)
    assert isinstance(result.error, ToolFailedError)
    assert "pg_verifybackup" in str(result.error)
    assert "backup_manifest" in str(result.error)
    assert not target.exists()


async def test_sqlite_snapshot_removed_when_the_job_fails(tmp_path: Path) -> None:
    path = tmp_path / "src.db"
    make_database(path, blobs=40)
    engine = SQLiteBackup(path, OPTIONS, fail_at=FailPoint(Phase.MID_STREAM, after_bytes=1_000_000))
    result = await vdistream.backup(engine, str(tmp_path / "store"), options=JOB)
    assert isinstance(result.error, InjectedFaultError)
    assert engine.snapshot.snapshot_path is not None
    assert not engine.snapshot.snapshot_path.parent.exists()
    assert sorted(tree(tmp_path)) == ["src.db"]


HALF_RESTORE = """
import sys, time, anyio
from pathlib import Path
from vdistream.engines.tarstream import TarExtractConsumer

async def main():
    data = Path(sys.argv[2]).read_bytes()
    consumer = TarExtractConsumer(sys.argv[1])
    async with consumer.running():
        await consumer.write(memoryview(data)[: len(data) // 2])
        while not any(Path(sys.argv[1]).iterdir()):
            await anyio.sleep(0.01)
        print("half", flush=True)
        await anyio.sleep(1000)

anyio.run(main)
"""


async def test_a_killed_base_backup_restore_is_emptied_by_the_next_restore(
    tmp_path: Path,
) -> None:
    """kill -9 mid-extraction leaves a half-filled directory and a free lock beside it:
    the next restore into it removes the debris and restores; while a restore runs,
    another one into the same directory is refused and nothing of it is touched."""
    import subprocess
    import sys

    source = tmp_path / "source"
    make_tree(source)
    archive = tmp_path / "source.tar"
    await anyio.run_process(["tar", "-C", str(source), "-cf", str(archive), "."])
    await backup_command(f"tar -C {source} -cf - .", tmp_path / "store", "t")
    target = tmp_path / "pgdata"

    def half_restore() -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", HALF_RESTORE, str(target), str(archive)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "half"
        return proc

    live = half_restore()
    lock = TarExtractConsumer(target).lock_path
    try:
        assert lock.exists()
        result = await restore_tar(tmp_path / "store", "t", target)
        assert isinstance(result.error, TargetExistsError), result.error
        assert "another restore" in str(result.error)
        assert any(target.iterdir())  # the live restore's files were not touched
    finally:
        live.kill()
        live.wait()
        assert live.stdout is not None
        live.stdout.close()
    assert any(target.iterdir())  # what kill -9 leaves: half a data directory
    assert lock.exists()  # and its lock, free

    result = await restore_tar(tmp_path / "store", "t", target)
    assert result.ok, result.error
    assert tree(target) == tree(source)
    assert not lock.exists()
