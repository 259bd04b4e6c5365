"""The command line against a real PostgreSQL: basebackup and dump, verify, restore."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli.test_cli import vdistream
from tests.databases.pgserver import PgCluster, PgServer


def test_basebackup_verify_restore_start(
    pg: PgServer, pg_cluster: PgCluster, tmp_path: Path
) -> None:
    pg.psql("CREATE TABLE IF NOT EXISTS cli_t AS SELECT g AS id FROM generate_series(1, 5000) g")
    dest = tmp_path / "backups"
    summary = json.loads(
        vdistream("backup", pg.url(), str(dest), "--mode", "basebackup", "--json").stdout
    )
    assert summary["status"] == "succeeded"
    manifest = json.loads((dest / summary["id"] / "manifest.json").read_text())
    assert manifest["engine"] == "postgresql"
    assert manifest["mode"] == "basebackup"
    assert "pg_basebackup" in json.dumps(manifest["versions"])

    report = json.loads(vdistream("verify", f"{dest}/{summary['id']}", "--json").stdout)
    content = [c for c in report["checks"] if c["name"] == "content"]
    assert content[0]["ok"]
    assert "pg_verifybackup" in content[0]["detail"]

    data = pg_cluster.place("cli-restored")
    vdistream("restore", f"{dest}/{summary['id']}", str(data), "--owner", "postgres")
    restored = pg_cluster.server("cli-restored", data)
    restored.start()
    try:
        assert restored.psql("SELECT count(*) FROM cli_t") == "5000"
    finally:
        restored.stop()


def test_dump_restore_into_a_new_database(pg: PgServer, tmp_path: Path) -> None:
    pg.psql("CREATE TABLE IF NOT EXISTS cli_d AS SELECT g AS id FROM generate_series(1, 777) g")
    dest = tmp_path / "backups"
    summary = json.loads(
        vdistream("backup", pg.url(), str(dest), "--mode", "dump", "--json").stdout
    )
    target = pg.url("cli_restored")
    vdistream("restore", f"{dest}/{summary['id']}", target, "--create")
    assert pg.psql("SELECT count(*) FROM cli_d", "cli_restored") == "777"


def test_unreachable_database(tmp_path: Path) -> None:
    url = f"postgresql://postgres@/postgres?host={tmp_path}&port=1"
    done = vdistream("backup", url, str(tmp_path / "d"), check=1)
    assert "Is the server running" in done.stderr  # the tool's own words
    assert str(tmp_path) in done.stderr  # where it tried
