"""The bridge the command line and the catalog call: URLs to sources, kinds to restores."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from tests.databases.conftest import OPTIONS
from vdistream.engines import (
    CommandBackup,
    CommandRestore,
    PostgresBaseBackup,
    PostgresBaseRestore,
    PostgresDump,
    PostgresDumpFile,
    PostgresDumpRestore,
    ScopedRestore,
    SQLiteBackup,
    SQLiteRestore,
    resolve_source,
    restore_engine,
)
from vdistream.engines.databases import DISCARD_TARGET, content_check
from vdistream.errors import ConfigError


@pytest.mark.parametrize(
    ("url", "mode", "kind", "resolved_mode", "display", "engine"),
    [
        ("sqlite:///srv/app.db", None, "sqlite", None, "sqlite:///srv/app.db", SQLiteBackup),
        (
            "sqlite:///srv/my%20app.db",
            None,
            "sqlite",
            None,
            "sqlite:///srv/my%20app.db",
            SQLiteBackup,
        ),
        (
            "postgresql://backup@db.example:5433/sales?sslmode=require",
            None,
            "postgresql",
            "basebackup",
            "postgresql://backup@db.example:5433/sales?sslmode=require",
            PostgresBaseBackup,
        ),
        (
            "postgres://u:secret@/db?host=/run/postgresql",
            "dump",
            "postgresql",
            "dump",
            "postgres://u@/db?host=/run/postgresql",
            PostgresDump,
        ),
        (
            "postgresql://",
            "basebackup",
            "postgresql",
            "basebackup",
            "postgresql://",
            PostgresBaseBackup,
        ),
        ("cmd:tar -C /srv -cf - .", None, "cmd", None, "cmd:tar -C /srv -cf - .", CommandBackup),
    ],
)
def test_resolve_source(
    url: str, mode: str | None, kind: str, resolved_mode: str | None, display: str, engine: type
) -> None:
    source = resolve_source(url, mode=mode)
    assert (source.kind, source.mode, source.display) == (kind, resolved_mode, display)
    assert "secret" not in repr(source)
    assert "secret" not in repr(dataclasses.asdict(source))  # what a catalog may store
    built = source.backup_engine(OPTIONS)
    assert isinstance(built, engine)
    assert source.backup_engine(OPTIONS) is not built  # an engine serves one job


def test_relative_sqlite_path_becomes_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    source = resolve_source("sqlite:data/app.db")
    assert source.display == f"sqlite://{tmp_path}/data/app.db"
    engine = source.backup_engine()
    assert isinstance(engine, SQLiteBackup)
    assert engine.path == tmp_path / "data" / "app.db"


@pytest.mark.parametrize(
    ("url", "mode", "says"),
    [
        ("mysql://db/x", None, "unknown scheme 'mysql'"),
        ("/var/lib/app.db", None, "no scheme"),
        ("", None, "no database URL"),
        ("sqlite://srv/app.db", None, "read as a host"),
        ("sqlite:", None, "names no database file"),
        ("sqlite:///srv/app.db?mode=ro", None, "query or #fragment"),
        ("sqlite:///srv/app.db", "dump", "has no modes"),
        ("postgresql://h:port/db", None, "port 'port' is not a number"),
        ("postgresql://h:99999/db", None, "is not a number in 1..65535"),
        ("postgresql://[::1/db", None, "malformed PostgreSQL URL"),
        ("postgresql://h/db#x", None, "fragment"),
        ("postgresql://h/db?sslmode", None, "not param=value"),
        ("postgresql://h/db", "pitr", "basebackup or dump"),
        ("cmd:", None, "names no program"),
        ("cmd:tar 'unbalanced", None, "cannot parse"),
    ],
)
def test_bad_urls_name_themselves(url: str, mode: str | None, says: str) -> None:
    with pytest.raises(ConfigError, match=says) as info:
        resolve_source(url, mode=mode)
    if url and "scheme" in says:
        assert url in str(info.value)
        assert "sqlite:, postgresql:, postgres:, cmd:" in str(info.value)


def test_a_bad_url_never_shows_its_password() -> None:
    with pytest.raises(ConfigError) as info:
        resolve_source("postgresql://u:hunter2@h:xx/db")
    assert "hunter2" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        resolve_source("mysql://u:hunter2@h/db")
    assert "hunter2" not in str(info.value)


def test_restore_engines(tmp_path: Path) -> None:
    assert isinstance(
        restore_engine("sqlite", None, str(tmp_path / "a.db"), OPTIONS), SQLiteRestore
    )
    assert isinstance(
        restore_engine("sqlite", None, f"sqlite://{tmp_path}/a.db", OPTIONS), SQLiteRestore
    )
    assert isinstance(
        restore_engine("postgresql", "basebackup", str(tmp_path / "pg"), OPTIONS),
        PostgresBaseRestore,
    )
    dump = restore_engine(
        "postgresql", "dump", "postgresql://u:pw@/new?host=/tmp", OPTIONS, create=True
    )
    assert isinstance(dump, PostgresDumpRestore)
    assert "pw" not in " ".join(dump.process.argv)
    assert "--no-owner" not in dump.process.argv
    clean = restore_engine(
        "postgresql", "dump", "postgresql:///x", OPTIONS, overwrite=True, no_owner=True
    )
    assert isinstance(clean, PostgresDumpRestore)
    assert {"--clean", "--if-exists", "--no-owner", "-w", "--exit-on-error"} <= set(
        clean.process.argv
    )
    assert isinstance(
        restore_engine("postgresql", "dump", str(tmp_path / "x.pgcustom"), OPTIONS),
        PostgresDumpFile,
    )
    command = restore_engine("cmd", None, "tar -x -C /tmp/x", OPTIONS)
    assert isinstance(command, CommandRestore)
    assert command.argv == ["tar", "-x", "-C", "/tmp/x"]
    assert isinstance(restore_engine("cmd", None, DISCARD_TARGET, OPTIONS), ScopedRestore)

    with pytest.raises(ConfigError, match="known kinds: sqlite, postgresql, cmd"):
        restore_engine("oracle", None, "x", OPTIONS)
    with pytest.raises(ConfigError, match="empty data directory"):
        restore_engine("postgresql", "basebackup", str(tmp_path), OPTIONS, overwrite=True)
    with pytest.raises(ConfigError, match="database's name"):
        restore_engine("postgresql", "dump", "postgresql://", OPTIONS, create=True)
    with pytest.raises(ConfigError, match="basebackup or dump"):
        restore_engine("postgresql", "pitr", "x", OPTIONS)


@pytest.mark.asyncio
async def test_content_check_targets_stay_inside_the_workdir(tmp_path: Path) -> None:
    for kind, mode in [("sqlite", None), ("postgresql", "basebackup"), ("postgresql", "dump")]:
        target, _ = await content_check(kind, mode, tmp_path)
        assert Path(target).parent == tmp_path
    target, check = await content_check("cmd", None, tmp_path)
    assert target == DISCARD_TARGET
    assert await check() == "stream reassembled and verified"
    assert os.listdir(tmp_path) == []
    with pytest.raises(ConfigError):
        await content_check("oracle", None, tmp_path)
