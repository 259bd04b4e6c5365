"""PostgreSQL through its own tools, against a real server started by the test run.

A base backup goes through 4 devices into files, is restored into a new empty
directory, passes ``pg_verifybackup``, and a second server started on it holds the same
pgbench data as the source. A dump goes the same way into a new database through
``pg_restore``. The failures a user meets come back with the tools' own words.
"""

from __future__ import annotations

import stat
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

import vdistream
from tests.databases.conftest import OPTIONS, tree
from tests.databases.pgserver import SERVER_USER, PgCluster, PgServer, running_as_root
from vdistream.engines import (
    ConsumerFailedError,
    EngineError,
    PostgresURL,
    ProducerFailedError,
    TargetExistsError,
    content_check,
    resolve_source,
    restore_engine,
)
from vdistream.engines.postgres import PostgresBaseRestore

JOB = vdistream.JobOptions(devices=4)
OWNER = SERVER_USER if running_as_root() else None


@dataclass(frozen=True)
class StoredBackup:
    store: Path
    backup_id: str
    summary: tuple[int, str]  # pgbench_accounts of the source when it was taken
    result: vdistream.JobResult


def take_backup(pg: PgServer, store: Path, mode: str) -> StoredBackup:
    """A backup of ``pg`` in ``mode`` through 4 devices into ``store`` (files)."""
    source = resolve_source(pg.url(), mode=mode)
    assert (source.kind, source.mode) == ("postgresql", mode)
    summary = pg.pgbench_summary()

    async def main() -> vdistream.JobResult:
        return await vdistream.backup(
            source.backup_engine(OPTIONS), str(store), backup_id=f"pg-{mode}", options=JOB
        )

    result = anyio.run(main)
    assert result.ok, result.error
    assert len(result.devices) == 4
    assert all(device.bytes > 0 for device in result.devices)
    assert pg.pgbench_summary() == summary  # nothing wrote in between
    return StoredBackup(store, result.backup_id, summary, result)


@pytest.fixture(scope="module")
def basebackup(pg: PgServer, tmp_path_factory: pytest.TempPathFactory) -> StoredBackup:
    return take_backup(pg, tmp_path_factory.mktemp("basebackup"), "basebackup")


@pytest.fixture(scope="module")
def dump(pg: PgServer, tmp_path_factory: pytest.TempPathFactory) -> StoredBackup:
    return take_backup(pg, tmp_path_factory.mktemp("dump"), "dump")


@pytest.fixture
def second_server(pg_cluster: PgCluster) -> Iterator[list[PgServer]]:
    """Servers a test starts; stopped after it."""
    started: list[PgServer] = []
    yield started
    for server in started:
        server.stop()


def truncate_to_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def append_line(path: Path, line: str) -> None:
    with path.open("a") as file:
        file.write(line + "\n")


async def restore(engine: vdistream.engines.Engine, stored: StoredBackup) -> vdistream.JobResult:
    return await vdistream.restore(engine, str(stored.store), stored.backup_id, options=JOB)


# --- base backup ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_basebackup_restores_into_a_server_with_the_same_data(
    basebackup: StoredBackup, pg_cluster: PgCluster, second_server: list[PgServer]
) -> None:
    assert basebackup.result.bytes > 20_000_000  # pgbench scale 2 and the WAL
    target = pg_cluster.place(f"restored-{uuid.uuid4().hex[:8]}") / "data"
    engine = restore_engine("postgresql", "basebackup", str(target), OPTIONS, owner=OWNER)
    result = await restore(engine, basebackup)
    assert result.ok, result.error
    assert isinstance(engine, PostgresBaseRestore)
    assert engine.verified == "backup successfully verified"
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    assert (target / "backup_manifest").is_file()  # PG15 writes it into the tar stream
    assert (target / "PG_VERSION").read_text().strip() == "15"
    if OWNER is not None:
        assert target.owner() == OWNER
        assert (target / "global" / "pg_control").owner() == OWNER

    server = pg_cluster.server(f"second-{uuid.uuid4().hex[:8]}", target)
    server.start()
    second_server.append(server)
    assert server.pgbench_summary() == basebackup.summary


@pytest.mark.asyncio
async def test_basebackup_restore_refuses_a_non_empty_directory(
    basebackup: StoredBackup, tmp_path: Path
) -> None:
    target = tmp_path / "data"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    result = await restore(
        restore_engine("postgresql", "basebackup", str(target), OPTIONS), basebackup
    )
    assert not result.ok
    assert isinstance(result.error, TargetExistsError)
    assert str(target) in str(result.error)
    assert "not empty" in str(result.error)
    assert (target / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]


@pytest.mark.asyncio
async def test_content_check_of_a_basebackup(basebackup: StoredBackup, tmp_path: Path) -> None:
    target, check = await content_check("postgresql", "basebackup", tmp_path)
    assert Path(target).parent == tmp_path
    result = await restore(restore_engine("postgresql", "basebackup", target, OPTIONS), basebackup)
    assert result.ok, result.error
    assert await check() == "pg_verifybackup: backup successfully verified"

    # Damage one file the manifest lists: the check names it.
    append_line(Path(target) / "PG_VERSION", "extra")
    with pytest.raises(EngineError, match=r"PG_VERSION.*size"):
        await check()


# --- dump ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_dump_restores_into_a_new_database(pg: PgServer, dump: StoredBackup) -> None:
    name = f"restored_{uuid.uuid4().hex[:8]}"
    engine = restore_engine("postgresql", "dump", pg.url(name), OPTIONS, create=True)
    result = await restore(engine, dump)
    assert result.ok, result.error
    assert pg.pgbench_summary(name) == dump.summary


@pytest.mark.asyncio
async def test_pg_restore_failure_fails_the_restore(pg: PgServer, dump: StoredBackup) -> None:
    # The tables exist already in the source database: pg_restore stops at the first error.
    result = await restore(restore_engine("postgresql", "dump", pg.url("postgres"), OPTIONS), dump)
    assert not result.ok
    assert isinstance(result.error, ConsumerFailedError)
    assert "pg_restore" in str(result.error)
    assert "already exists" in str(result.error)
    assert "exited with status 1" in str(result.error)
    assert pg.pgbench_summary() == dump.summary


@pytest.mark.asyncio
async def test_a_database_created_for_a_failed_restore_is_dropped(
    pg: PgServer, tmp_path: Path
) -> None:
    # A stream that is not a pg_dump archive at all.
    junk = resolve_source("cmd:head -c 300000 /dev/urandom").backup_engine(OPTIONS)
    backed = await vdistream.backup(junk, str(tmp_path), backup_id="junk", options=JOB)
    assert backed.ok, backed.error
    name = f"doomed_{uuid.uuid4().hex[:8]}"
    engine = restore_engine("postgresql", "dump", pg.url(name), OPTIONS, create=True)
    result = await vdistream.restore(engine, str(tmp_path), "junk", options=JOB)
    assert not result.ok
    assert isinstance(result.error, ConsumerFailedError)
    assert "pg_restore" in str(result.error)
    assert pg.psql(f"SELECT count(*) FROM pg_database WHERE datname = '{name}'") == "0"


@pytest.mark.asyncio
async def test_content_check_of_a_dump(dump: StoredBackup, tmp_path: Path) -> None:
    target, check = await content_check("postgresql", "dump", tmp_path)
    result = await restore(restore_engine("postgresql", "dump", target, OPTIONS), dump)
    assert result.ok, result.error
    text = await check()
    assert text.startswith("pg_restore --list: ")
    assert int(text.split(": ")[1].split()[0]) >= 4  # pgbench's four tables at least

    truncate_to_half(Path(target))
    with pytest.raises(EngineError, match="pg_restore"):
        await check()


# --- connections and failures --------------------------------------------------------


@pytest.mark.asyncio
async def test_password_never_leaves_the_url(pg: PgServer, tmp_path: Path) -> None:
    secret = "s3cr3t-Pa55"
    source = resolve_source(pg.url(password=secret), mode="dump")
    assert secret not in source.display
    assert secret not in repr(source)
    engine = source.backup_engine(OPTIONS)
    assert secret not in " ".join(engine.process.argv)  # type: ignore[attr-defined]
    assert engine.process.extra_env == {"PGPASSWORD": secret}  # type: ignore[attr-defined]
    info = await source.describe()
    assert secret not in repr(info)
    assert info["server_version"].startswith("PostgreSQL 15")
    assert info["server_version_num"].startswith("15")
    assert "pg_dump (PostgreSQL) 15" in info["pg_dump"]
    assert info["source"] == source.display
    # trust authentication ignores the password, but the dump runs with it in PGPASSWORD
    result = await vdistream.backup(engine, str(tmp_path), options=JOB)
    assert result.ok, result.error


@pytest.mark.asyncio
async def test_describe_a_basebackup_source(pg: PgServer) -> None:
    info = await resolve_source(pg.url()).describe()
    assert info["kind"] == "postgresql"
    assert info["mode"] == "basebackup"
    assert "pg_basebackup (PostgreSQL) 15" in info["pg_basebackup"]
    assert "pg_verifybackup (PostgreSQL) 15" in info["pg_verifybackup"]


@pytest.mark.asyncio
async def test_unreachable_server_fails_with_the_tools_words(
    pg_cluster: PgCluster, tmp_path: Path
) -> None:
    nobody = pg_cluster.directory(f"nobody-{uuid.uuid4().hex[:8]}")
    url = f"postgresql://postgres@/postgres?host={nobody}&port=5999"
    result = await vdistream.backup(
        resolve_source(url).backup_engine(OPTIONS), str(tmp_path), options=JOB
    )
    assert not result.ok
    assert isinstance(result.error, ProducerFailedError)
    message = str(result.error)
    assert "pg_basebackup" in message
    assert f'connection to server on socket "{nobody}/.s.PGSQL.5999" failed' in message
    assert "exited with status 1" in message
    assert tree(tmp_path) == {}
    with pytest.raises(EngineError, match="connection to server"):
        await resolve_source(url).describe()


def test_url_keeps_libpq_parameters_and_drops_secrets() -> None:
    url = PostgresURL.parse(
        "postgresql://alice:p%40ss@db1:5432,db2:5433/sales?sslmode=require&password=other"
        "&sslpassword=key"
    )
    assert url.password == "other"  # libpq: the later setting wins
    assert url.url == "postgresql://alice@db1:5432,db2:5433/sales?sslmode=require&sslpassword=key"
    assert url.display == "postgresql://alice@db1:5432,db2:5433/sales?sslmode=require"
    assert url.dbname == "sales"
    assert url.env() == {"PGPASSWORD": "other"}
    assert "p@ss" not in repr(url)
    assert "other" not in repr(url)
    other = url.with_dbname("new db")
    assert other.url.startswith("postgresql://alice@db1:5432,db2:5433/new%20db?")
    assert other.password == "other"
    bare = PostgresURL.parse("postgresql://")
    assert (bare.url, bare.dbname, bare.password) == ("postgresql://", None, None)
    assert PostgresURL.parse("postgresql://bob:pw@h/db").password == "pw"


@pytest.mark.asyncio
async def test_connection_from_pg_environment_variables(
    pg: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGHOST", str(pg.socket_dir))
    monkeypatch.setenv("PGPORT", str(pg.port))
    monkeypatch.setenv("PGUSER", SERVER_USER)
    monkeypatch.setenv("PGDATABASE", "postgres")
    source = resolve_source("postgresql://", mode="dump")
    assert source.display == "postgresql://"
    info = await source.describe()
    assert info["server_version"].startswith("PostgreSQL 15")
    result = await vdistream.backup(source.backup_engine(OPTIONS), str(tmp_path), options=JOB)
    assert result.ok, result.error
    assert result.engine_result.logical_bytes > 100_000  # type: ignore[attr-defined]


# --- a failed restore leaves no target -------------------------------------------------


async def _stored_with_manifest(pg: PgServer, dest: Path, mode: str) -> str:
    """A backup through the operations layer (so it has a manifest to check against)."""
    from vdistream.operations import BackupSettings, run_backup

    outcome = await run_backup(
        pg.url(),
        str(dest),
        BackupSettings(
            devices=4,
            mode=mode,
            backup_id=f"flip-{mode}",
            block_size=OPTIONS.block_size,
            max_transfer_size=OPTIONS.max_transfer_size,
        ),
    )
    assert outcome.ok, outcome.result.error
    return outcome.result.backup_id


def _flip_near_the_end(dest: Path, backup_id: str, index: int = 2) -> Path:
    stream = sorted((dest / backup_id).glob("stream-*.vdi"))[index]
    data = bytearray(stream.read_bytes())
    data[len(data) - 100] ^= 1
    stream.write_bytes(bytes(data))
    return stream


@pytest.mark.asyncio
async def test_a_flipped_bit_near_the_end_leaves_no_data_directory(
    pg: PgServer, tmp_path: Path
) -> None:
    from vdistream.errors import StorageIntegrityError
    from vdistream.operations import run_restore

    dest = tmp_path / "dest"
    backup_id = await _stored_with_manifest(pg, dest, "basebackup")
    stream = _flip_near_the_end(dest, backup_id)
    out = tmp_path / "out"
    out.mkdir()
    target = out / "data"
    result = await run_restore(f"{dest}/{backup_id}", str(target), owner=OWNER)
    assert not result.ok
    assert not target.exists()
    assert list(out.iterdir()) == []
    assert isinstance(result.error, StorageIntegrityError), result.error
    assert "device 2" in str(result.error)
    assert stream.as_uri() in str(result.error)

    # An empty directory given as the target is left empty, as it was found.
    target.mkdir()
    result = await run_restore(f"{dest}/{backup_id}", str(target), owner=OWNER)
    assert not result.ok
    assert list(target.iterdir()) == []


@pytest.mark.asyncio
async def test_a_flipped_bit_near_the_end_leaves_the_database_untouched(
    pg: PgServer, tmp_path: Path
) -> None:
    """pg_restore into a live database runs as one transaction, and does not reach the
    end of the archive before every stream passed its checks: nothing is committed."""
    from vdistream.errors import StorageIntegrityError
    from vdistream.operations import run_restore

    dest = tmp_path / "dest"
    backup_id = await _stored_with_manifest(pg, dest, "dump")
    _flip_near_the_end(dest, backup_id)
    name = f"untouched_{uuid.uuid4().hex[:8]}"
    pg.psql(f"CREATE DATABASE {name}")
    result = await run_restore(f"{dest}/{backup_id}", pg.url(name))
    assert not result.ok
    assert isinstance(result.error, StorageIntegrityError), result.error
    tables = "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
    assert pg.psql(tables, name) == "0"

    # The same archive, undamaged, restores completely into that database.
    _flip_near_the_end(dest, backup_id)  # flipped back
    result = await run_restore(f"{dest}/{backup_id}", pg.url(name))
    assert result.ok, result.error
    assert pg.pgbench_summary(name) == pg.pgbench_summary()
