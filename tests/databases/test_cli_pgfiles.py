"""The command line against a real PostgreSQL in files mode: backup, list, verify,
restore, start, delta restore; and what the command line refuses (exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

from tests.cli.test_cli import vdistream
from tests.databases.pgserver import PgCluster, PgServer


def _accounts(server: PgServer) -> str:
    return server.psql(
        "SELECT md5(string_agg(aid::text || ':' || abalance::text, ',' ORDER BY aid)) "
        "FROM pgbench_accounts"
    )


def test_files_backup_verify_restore_start_delta(
    pg: PgServer, pg_cluster: PgCluster, tmp_path: Path
) -> None:
    pg.psql(
        "DROP TABLE IF EXISTS cli_f; "
        "CREATE TABLE cli_f AS SELECT g AS id FROM generate_series(1, 4321) g"
    )
    before = _accounts(pg)
    dest = tmp_path / "backups"
    summary = json.loads(
        vdistream(
            "backup", pg.url(), str(dest), "--mode", "files", "--devices", "3", "--json"
        ).stdout
    )
    assert summary["status"] == "succeeded"
    manifest = json.loads((dest / summary["id"] / "manifest.json").read_text())
    assert (manifest["engine"], manifest["mode"]) == ("postgresql", "files")
    record = manifest["postgresql"]
    paths = {row[0] for row in record["files"]}
    assert {"PG_VERSION", "global/pg_control", "backup_label"} <= paths
    assert any(path.startswith("pg_wal/0") for path in paths)  # the WAL the backup needs
    assert not any(path == "postmaster.pid" for path in paths)
    assert {row[4] for row in record["files"]} == {0, 1, 2}  # files on every device
    # no slot and no backup left running on the server
    assert pg.psql("SELECT count(*) FROM pg_replication_slots") == "0"

    listed = vdistream("list", str(dest)).stdout
    assert "postgresql/files" in listed

    report = json.loads(vdistream("verify", f"{dest}/{summary['id']}", "--json").stdout)
    content = [c for c in report["checks"] if c["name"] == "content"]
    assert content[0]["ok"], report
    assert "pg_controldata" in content[0]["detail"]

    data = pg_cluster.place("cli-files-restored")
    vdistream("restore", f"{dest}/{summary['id']}", str(data), "--owner", "postgres")
    restored = pg_cluster.server("cli-files-restored", data)
    restored.start()
    try:
        assert restored.psql("SELECT count(*) FROM cli_f") == "4321"
        assert _accounts(restored) == before
        restored.psql("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid < 100")
        restored.psql("CREATE TABLE cli_extra AS SELECT 1 AS x")
        restored.psql("CHECKPOINT")
    finally:
        restored.stop()

    # over the stopped, changed cluster: only what differs is written
    done = json.loads(
        vdistream(
            "restore",
            f"{dest}/{summary['id']}",
            str(data),
            "--delta",
            "--owner",
            "postgres",
            "--json",
        ).stdout
    )
    assert done["status"] == "succeeded", done
    # few files differ: the delta restore wrote them (pg_control among them) and kept the rest
    assert 1 <= done["written_files"] < done["skipped_files"]
    assert done["removed_paths"] >= 1  # cli_extra's file
    restored.start()
    try:
        assert _accounts(restored) == before
        missing = restored.psql("SELECT count(*) FROM pg_class WHERE relname = 'cli_extra'")
        assert missing == "0"
    finally:
        restored.stop()


def test_delta_refused_for_other_backups_and_modes(pg: PgServer, tmp_path: Path) -> None:
    dest = tmp_path / "backups"
    summary = json.loads(
        vdistream("backup", pg.url(), str(dest), "--mode", "dump", "--json").stdout
    )
    done = vdistream(
        "restore", f"{dest}/{summary['id']}", str(tmp_path / "x.dump"), "--delta", check=2
    )
    assert "delta restore is for PostgreSQL backups in files mode" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "x.dump").exists()


def test_files_restore_refuses_a_non_empty_directory(pg: PgServer, tmp_path: Path) -> None:
    dest = tmp_path / "backups"
    summary = json.loads(
        vdistream("backup", pg.url(), str(dest), "--mode", "files", "--json").stdout
    )
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    done = vdistream("restore", f"{dest}/{summary['id']}", str(target), check=1)
    assert str(target) in done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]
    assert (target / "keep.txt").read_text() == "mine"


def test_verify_keeps_a_tablespace_inside_its_scratch_directory(
    pg_cluster: PgCluster, tmp_path: Path
) -> None:
    """verify restores the tablespaces under its work directory, never at their
    recorded location (the live cluster's, on the database host)."""
    server = pg_cluster.initdb(f"cli-ts-{uuid.uuid4().hex[:6]}")
    server.start()
    try:
        location = pg_cluster.directory(f"cli-ts-{uuid.uuid4().hex[:6]}")
        server.psql(f"CREATE TABLESPACE far LOCATION '{location}'")
        server.psql("CREATE TABLE faraway TABLESPACE far AS SELECT 1 AS x")
        before = sorted(str(p) for p in location.rglob("*"))
        dest = tmp_path / "backups"
        summary = json.loads(
            vdistream("backup", server.url(), str(dest), "--mode", "files", "--json").stdout
        )
        manifest = json.loads((dest / summary["id"] / "manifest.json").read_text())
        assert list(manifest["postgresql"]["tablespaces"].values()) == [str(location)]
        work = tmp_path / "work"
        work.mkdir()
        done = subprocess.run(
            [sys.executable, "-m", "vdistream", "verify", f"{dest}/{summary['id']}", "--json"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "TMPDIR": str(work)},  # where verify makes its scratch
        )
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert all(c["ok"] for c in report["checks"]), report
        assert sorted(str(p) for p in location.rglob("*")) == before  # untouched
        assert list(work.iterdir()) == []  # the scratch directory went away
    finally:
        server.stop()
