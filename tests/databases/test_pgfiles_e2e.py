"""``--mode files`` end to end against real PostgreSQL servers: backed up by
``PgFilesBackup`` (while pgbench writes, and quiesced), restored by ``PgFilesRestore``
into an empty directory given to ``postgres``, a server started on the result (it
recovers from ``backup_label``), its data compared and checked with ``amcheck``; a
delta restore over a changed copy writes few files; a backup killed with ``kill -9``
leaves neither a running backup nor a replication slot behind.

The server here is the test's own (not the session's ``pg``), because pgbench writes
into it while it is backed up.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

import vdistream
from tests.databases.conftest import OPTIONS
from tests.databases.pgserver import SERVER_USER, PgCluster, PgServer, run, running_as_root
from vdistream.engines.pgfiles.backup import PgFilesBackup
from vdistream.engines.pgfiles.layout import EntryKind, FileRecord
from vdistream.engines.pgfiles.restore import PgFilesRestore, PgFilesRestoreResult

JOB = vdistream.JobOptions(devices=4)
OWNER = SERVER_USER if running_as_root() else None
SCALE = 3
#: Bound of every wait for a server-side state (a slot to appear or vanish).
WAIT_SECONDS = 60.0


@dataclass(frozen=True)
class Stored:
    store: Path
    backup_id: str
    records: tuple[FileRecord, ...]


def pgbench_connection(server: PgServer) -> list[str]:
    # pgbench's -d is --debug: the database is its last argument.
    connection = ["-h", str(server.socket_dir), "-p", str(server.port), "-U", SERVER_USER]
    return [*connection, "postgres"]


@pytest.fixture(scope="module")
def source(pg_cluster: PgCluster) -> Iterator[PgServer]:
    """A server of its own with pgbench data, and a table pgbench never writes."""
    server = pg_cluster.initdb(f"pgfiles-{uuid.uuid4().hex[:6]}")
    server.start()
    run([server.tool("pgbench"), "-i", "-s", str(SCALE), "-q", *pgbench_connection(server)])
    server.psql(
        "CREATE TABLE fixed AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 50000) g"
    )
    server.psql("CREATE INDEX fixed_v ON fixed (v)")
    yield server
    server.stop()


@pytest.fixture
def started(pg_cluster: PgCluster) -> Iterator[list[PgServer]]:
    servers: list[PgServer] = []
    yield servers
    for server in servers:
        server.stop()


def backup(server: PgServer, store: Path) -> Stored:
    async def main() -> vdistream.JobResult:
        return await vdistream.backup(
            PgFilesBackup(server.url(), OPTIONS), str(store), backup_id="pgf", options=JOB
        )

    result = anyio.run(main)
    assert result.ok, result.error
    files = result.engine_result.postgresql["files"]  # type: ignore[attr-defined]
    return Stored(store, "pgf", tuple(FileRecord.from_json(row) for row in files))


def restore(stored: Stored, target: Path, *, delta: bool = False) -> PgFilesRestoreResult:
    engine = PgFilesRestore(target, OPTIONS, delta=delta, expected=stored.records, owner=OWNER)

    async def main() -> vdistream.JobResult:
        return await vdistream.restore(engine, str(stored.store), stored.backup_id, options=JOB)

    result = anyio.run(main)
    assert result.ok, result.error
    assert isinstance(result.engine_result, PgFilesRestoreResult)
    return result.engine_result


def fixed_digest(server: PgServer) -> str:
    return server.psql("SELECT md5(string_agg(id::text || v, ',' ORDER BY id)) FROM fixed")


def balances(server: PgServer) -> tuple[str, ...]:
    """pgbench's invariant: every transaction adds the same delta to one account, one
    teller, one branch and the history, so the four sums agree in any consistent state."""
    row = server.psql(
        "SELECT (SELECT coalesce(sum(abalance), 0) FROM pgbench_accounts), "
        "(SELECT coalesce(sum(tbalance), 0) FROM pgbench_tellers), "
        "(SELECT coalesce(sum(bbalance), 0) FROM pgbench_branches), "
        "(SELECT coalesce(sum(delta), 0) FROM pgbench_history)"
    )
    return tuple(row.split("|"))


def amcheck(server: PgServer) -> None:
    server.psql("CREATE EXTENSION IF NOT EXISTS amcheck")
    indexes = server.psql(
        "SELECT string_agg(c.relname, ',') FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "JOIN pg_class t ON t.oid = i.indrelid WHERE t.relname IN "
        "('pgbench_accounts', 'pgbench_branches', 'pgbench_tellers', 'fixed')"
    ).split(",")
    assert len(indexes) == 4
    for index in indexes:
        server.psql(f"SELECT bt_index_check('{index}'::regclass, true)")


def start_on(pg_cluster: PgCluster, target: Path, started: list[PgServer]) -> PgServer:
    server = pg_cluster.server(f"restored-{uuid.uuid4().hex[:8]}", target)
    server.start()
    started.append(server)
    return server


def new_target(pg_cluster: PgCluster) -> Path:
    return pg_cluster.place(f"pgfiles-restored-{uuid.uuid4().hex[:8]}") / "data"


def test_a_backup_taken_while_pgbench_writes_restores_consistent(
    source: PgServer,
    pg_cluster: PgCluster,
    started: list[PgServer],
    tmp_path: Path,
) -> None:
    fixed = fixed_digest(source)
    bench = [source.tool("pgbench"), "-n", "-c", "2", "-T", "600", *pgbench_connection(source)]
    writer = subprocess.Popen(bench, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # let it start writing (not a timing assertion)
        before = source.psql("SELECT count(*) FROM pgbench_history")
        stored = backup(source, tmp_path / "store")
        after = source.psql("SELECT count(*) FROM pgbench_history")
    finally:
        writer.send_signal(signal.SIGINT)
        writer.wait(timeout=WAIT_SECONDS)
    assert int(after) > int(before)  # pgbench did write during the backup
    target = new_target(pg_cluster)
    result = restore(stored, target)
    assert result.written_files == sum(r.kind is not EntryKind.DIRECTORY for r in stored.records)
    assert not (target / "postmaster.pid").exists()
    restored = start_on(pg_cluster, target, started)
    assert fixed_digest(restored) == fixed
    assert restored.psql("SELECT count(*) FROM pgbench_accounts") == str(SCALE * 100000)
    sums = balances(restored)
    assert len(set(sums)) == 1, sums
    assert int(restored.psql("SELECT count(*) FROM pgbench_history")) >= int(before)
    amcheck(restored)


@pytest.fixture(scope="module")
def quiet(
    source: PgServer, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Stored, tuple[int, str]]:
    """A backup of the source while nothing writes, with its pgbench summary."""
    summary = source.pgbench_summary()
    stored = backup(source, tmp_path_factory.mktemp("pgfiles-quiet"))
    assert source.pgbench_summary() == summary
    return stored, summary


def test_a_quiet_backup_restores_exactly_and_a_delta_restore_writes_little(
    quiet: tuple[Stored, tuple[int, str]],
    pg_cluster: PgCluster,
    started: list[PgServer],
) -> None:
    stored, summary = quiet
    target = new_target(pg_cluster)
    restore(stored, target)
    restored = start_on(pg_cluster, target, started)
    assert restored.pgbench_summary() == summary
    amcheck(restored)

    # Change the copy, stop it, and bring it back with a delta restore.
    restored.psql("UPDATE pgbench_accounts SET abalance = abalance + 7 WHERE aid <= 500")
    restored.psql("CHECKPOINT")
    assert restored.pgbench_summary() != summary
    (target / "stray-file").write_text("not in the backup")
    restored.stop()
    assert not (target / "postmaster.pid").exists()
    result = restore(stored, target, delta=True)
    files = sum(r.kind is not EntryKind.DIRECTORY for r in stored.records)
    assert result.skipped_files > 0
    assert result.written_files + result.skipped_files == files
    assert result.written_files < files // 4, (result.written_files, files)
    assert result.removed_paths >= 1  # stray-file, backup_label.old, new WAL
    assert not (target / "stray-file").exists()
    restored.start()
    assert restored.pgbench_summary() == summary
    amcheck(restored)


def test_a_delta_restore_refuses_a_running_server(
    quiet: tuple[Stored, tuple[int, str]], source: PgServer
) -> None:
    stored, _ = quiet
    engine = PgFilesRestore(source.data, OPTIONS, delta=True, expected=stored.records)

    async def main() -> vdistream.JobResult:
        return await vdistream.restore(engine, str(stored.store), stored.backup_id, options=JOB)

    result = anyio.run(main)
    assert not result.ok
    assert "a server is running on" in str(result.error)
    assert (source.data / "global" / "pg_control").exists()
    source.psql("SELECT 1")


_KILLED_BACKUP = """
import sys, anyio, vdistream
from vdistream.engines import StripingOptions
from vdistream.engines.faults import Action, FailPoint, Phase
from vdistream.engines.pgfiles.backup import PgFilesBackup

async def main():
    engine = PgFilesBackup(
        sys.argv[1],
        StripingOptions(block_size=4096, max_transfer_size=256 * 1024),
        fail_at=FailPoint(Phase.MID_STREAM, Action.STALL, after_bytes=4 << 20),
    )
    await vdistream.backup(engine, sys.argv[2], backup_id="killed",
                           options=vdistream.JobOptions(devices=4, stall_timeout=3600))

anyio.run(main)
"""


def _wait_for(server: PgServer, sql: str, want: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while (got := server.psql(sql)) != want:
        assert time.monotonic() < deadline, f"{sql} stayed {got}, expected {want}"
        time.sleep(0.1)


def test_a_backup_killed_with_sigkill_leaves_no_slot_and_no_backup(
    source: PgServer, tmp_path: Path
) -> None:
    slots = "SELECT count(*) FROM pg_replication_slots"
    assert source.psql(slots) == "0"
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_BACKUP, source.url(), str(tmp_path / "store")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    try:
        _wait_for(source, slots, "1")  # the backup is running: its slot is there
    finally:
        child.kill()
        child.wait(timeout=WAIT_SECONDS)
    _wait_for(source, slots, "0")
    # No backup is left running: a new one starts and stops at once.
    lsn = source.psql("SELECT pg_backup_start('after kill', true); SELECT pg_backup_stop(false)")
    assert lsn


def test_a_cluster_with_a_tablespace_restores_into_its_location(
    pg_cluster: PgCluster, started: list[PgServer], tmp_path: Path
) -> None:
    server = pg_cluster.initdb(f"pgfiles-ts-{uuid.uuid4().hex[:6]}")
    server.start()
    started.append(server)
    location = pg_cluster.directory(f"ts-{uuid.uuid4().hex[:6]}")
    server.psql(f"CREATE TABLESPACE far LOCATION '{location}'")
    server.psql(
        "CREATE TABLE faraway TABLESPACE far AS SELECT g AS id, md5(g::text) AS v "
        "FROM generate_series(1, 20000) g"
    )
    digest = server.psql("SELECT md5(string_agg(v, ',' ORDER BY id)) FROM faraway")
    stored = backup(server, tmp_path / "store")
    links = [r for r in stored.records if r.kind is EntryKind.SYMLINK]
    assert [r.target for r in links] == [str(location)]
    # The source is gone (its tablespace location moved away): the restore recreates it.
    server.stop()
    location.rename(location.with_name(location.name + ".source"))
    target = new_target(pg_cluster)
    restore(stored, target)
    assert os.readlink(target / links[0].path) == str(location)
    assert any(location.iterdir())
    restored = start_on(pg_cluster, target, started)
    assert restored.psql("SELECT md5(string_agg(v, ',' ORDER BY id)) FROM faraway") == digest
