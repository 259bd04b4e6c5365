"""Work directories of killed runs are removed by the next run; a live one never is.

Real processes hold the owner locks (``claim_workdir`` in a child Python), and are
killed with SIGKILL; the CLI is killed while its SQLite snapshot directory exists,
and the next CLI backup with the same ``TMPDIR`` removes what it left.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.databases.test_sqlite import make_database
from vdistream.engines.sqlite import SNAPSHOT_PREFIX
from vdistream.engines.workdir import claim_workdir, release_workdir, sweep_workdir
from vdistream.ownership import LOCK_NAME, owner_gone

REPO = Path(__file__).resolve().parents[2]

HOLDER = """
import sys, time
from vdistream.engines.workdir import claim_workdir
directory, lock = claim_workdir(sys.argv[1], sys.argv[2])
(directory / "snapshot.db").write_bytes(b"x" * int(sys.argv[3]))
print(directory, flush=True)
time.sleep(1000)
"""


@pytest.fixture
def holders() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def hold(
    parent: Path, started: list[subprocess.Popen[str]], size: int = 0
) -> tuple[subprocess.Popen[str], Path]:
    """A live process that claimed a ``vdistream-sqlite-*`` directory of ``parent``."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(parent), SNAPSHOT_PREFIX, str(size)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    started.append(proc)
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def test_sweep_removes_what_dead_owners_left_and_nothing_else(
    tmp_path: Path, holders: list[subprocess.Popen[str]], caplog: pytest.LogCaptureFixture
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    killed, dead_dir = hold(work, holders, size=300_000)
    live, live_dir = hold(work, holders)
    legacy = work / f"{SNAPSHOT_PREFIX}old"  # made before there were locks: no lock file
    legacy.mkdir()
    other = work / "somebody-else"
    other.mkdir()
    assert (dead_dir / LOCK_NAME).exists()
    assert not owner_gone(dead_dir / LOCK_NAME)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert owner_gone(dead_dir / LOCK_NAME)

    with caplog.at_level(logging.INFO, logger="vdistream.engines.workdir"):
        removed = sweep_workdir(work, SNAPSHOT_PREFIX)
    assert removed == [dead_dir]
    assert sorted(p.name for p in work.iterdir()) == sorted(
        [live_dir.name, legacy.name, other.name]
    )
    assert (live_dir / "snapshot.db").exists()
    assert live.poll() is None
    (event,) = [r for r in caplog.records if r.getMessage() == "debris_removed"]
    assert event.path == str(dead_dir)  # type: ignore[attr-defined]
    assert event.bytes >= 300_000  # type: ignore[attr-defined]


def test_a_claimed_directory_is_locked_for_this_process_too(tmp_path: Path) -> None:
    directory, lock = claim_workdir(tmp_path, SNAPSHOT_PREFIX)
    assert directory.parent == tmp_path
    assert directory.name.startswith(SNAPSHOT_PREFIX)
    assert oct(directory.stat().st_mode & 0o777) == oct(0o700)
    assert sorted(p.name for p in directory.iterdir()) == [LOCK_NAME]
    assert sweep_workdir(tmp_path, SNAPSHOT_PREFIX) == []  # our own live directory
    assert directory.exists()
    release_workdir(directory, lock)
    assert not directory.exists()
    assert not lock.held


def cli_backup(
    source: Path, dest: Path, tmpdir: Path, *, stdout: int | None = None
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "vdistream", "backup", f"sqlite://{source}", str(dest)],
        stdin=subprocess.DEVNULL,
        stdout=stdout if stdout is not None else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "TMPDIR": str(tmpdir)},
    )


def snapshot_dirs(parent: Path) -> list[Path]:
    return sorted(p for p in parent.iterdir() if p.name.startswith(SNAPSHOT_PREFIX))


def test_kill_9_during_a_sqlite_backup_then_the_next_backup_removes_its_snapshot(
    tmp_path: Path, holders: list[subprocess.Popen[str]]
) -> None:
    source = tmp_path / "big.db"
    make_database(source, blobs=800)  # 50 MiB: the backup takes a while
    work = tmp_path / "work"
    work.mkdir()
    proc = cli_backup(source, tmp_path / "dest", work)
    deadline = time.monotonic() + 30
    while not snapshot_dirs(work):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
        assert time.monotonic() < deadline, "no snapshot directory appeared"
        time.sleep(0.005)
    time.sleep(0.05)  # the snapshot is being written
    proc.kill()
    proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()
    (left,) = snapshot_dirs(work)
    assert owner_gone(left / LOCK_NAME)
    _live, live_dir = hold(work, holders)  # a backup running meanwhile

    again = cli_backup(source, tmp_path / "dest", work)
    _, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    assert snapshot_dirs(work) == [live_dir]


def test_a_killed_verify_leaves_its_scratch_directory_to_the_next_verify(
    tmp_path: Path,
) -> None:
    import anyio

    from vdistream.operations import VERIFY_WORKDIR_PREFIX, run_backup, run_verify

    source = tmp_path / "app.db"
    make_database(source, blobs=2)
    outcome = anyio.run(run_backup, f"sqlite:///{source}", str(tmp_path / "dest"))
    assert outcome.ok
    work = tmp_path / "work"
    work.mkdir()
    dead = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(work), VERIFY_WORKDIR_PREFIX, "1000"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert dead.stdout is not None
    left = Path(dead.stdout.readline().strip())
    dead.kill()
    dead.wait()
    dead.stdout.close()
    assert left.is_dir()

    async def verify() -> object:
        backup = str(tmp_path / "dest" / outcome.result.backup_id)
        return await run_verify(backup, workdir=work)

    report = anyio.run(verify)
    assert getattr(report, "ok", False), report
    assert list(work.iterdir()) == []  # the dead one swept, its own removed
