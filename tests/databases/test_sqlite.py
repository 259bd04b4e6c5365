"""SQLite: online backups of a database being written to, restores checked before use."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import vdistream
from tests.databases.conftest import OPTIONS, tree
from vdistream.engines import (
    SQLiteError,
    TargetExistsError,
    content_check,
    resolve_source,
    restore_engine,
)
from vdistream.engines.sqlite import SQLiteBackup, SQLiteRestore, database_info, integrity_check

pytestmark = pytest.mark.asyncio

JOB = vdistream.JobOptions(devices=4)


def make_database(path: Path, *, wal: bool = True, blobs: int = 400) -> None:
    """A database of ``blobs`` rows of 64 KiB (so that a copy takes a while) and an
    empty ``log`` table for the writer."""
    with sqlite3.connect(path) as db:
        if wal:
            db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE filler (id INTEGER PRIMARY KEY, data BLOB)")
        db.execute("CREATE TABLE log (id INTEGER PRIMARY KEY, note TEXT NOT NULL)")
        db.execute("CREATE INDEX log_note ON log (note)")
        db.executemany(
            "INSERT INTO filler (data) VALUES (?)", ((os.urandom(65536),) for _ in range(blobs))
        )
    db.close()


class Writer(threading.Thread):
    """Inserts ids 1, 2, 3, ... into ``log``, one committed transaction each."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.committed = 0
        self.stop = threading.Event()
        self.started_writing = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            try:
                while not self.stop.is_set():
                    next_id = self.committed + 1
                    db.execute("BEGIN IMMEDIATE")
                    db.execute("INSERT INTO log (id, note) VALUES (?, ?)", (next_id, f"n{next_id}"))
                    db.execute("COMMIT")
                    self.committed = next_id
                    if next_id >= 50:
                        self.started_writing.set()
            finally:
                db.close()
        except BaseException as exc:  # reported by the test
            self.error = exc
            self.started_writing.set()


@pytest.fixture
def writer_db(tmp_path: Path) -> Iterator[tuple[Path, Writer]]:
    path = tmp_path / "live" / "app.db"
    path.parent.mkdir()
    make_database(path)
    writer = Writer(path)
    writer.start()
    assert writer.started_writing.wait(30)
    yield path, writer
    writer.stop.set()
    writer.join(30)


def damage_root_pages(path: Path, names: list[str]) -> None:
    """Overwrite the root pages of these tables or indexes with 0xFF bytes."""
    with sqlite3.connect(path) as db:
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        roots = [
            db.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (name,)).fetchone()[0]
            for name in names
        ]
    db.close()
    with path.open("r+b") as file:
        for page in roots:
            file.seek((page - 1) * page_size)
            file.write(b"\xff" * page_size)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def backup_of(path: Path, store: Path, backup_id: str = "sq") -> vdistream.JobResult:
    source = resolve_source(f"sqlite://{path}")
    result = await vdistream.backup(
        source.backup_engine(OPTIONS), str(store), backup_id=backup_id, options=JOB
    )
    return result


async def test_online_backup_of_a_wal_database_being_written(
    writer_db: tuple[Path, Writer], tmp_path: Path
) -> None:
    path, writer = writer_db
    before = writer.committed
    store = tmp_path / "store"
    engine = SQLiteBackup(path, OPTIONS)
    result = await vdistream.backup(engine, str(store), backup_id="sq", options=JOB)
    during = writer.committed
    assert result.ok, result.error
    assert writer.error is None
    assert all(device.bytes > 0 for device in result.devices)
    # The snapshot's temporary directory is gone.
    assert engine.snapshot.snapshot_path is not None
    assert not engine.snapshot.snapshot_path.parent.exists()

    target = tmp_path / "restored" / "app.db"
    target.parent.mkdir()
    restorer = restore_engine("sqlite", None, str(target), OPTIONS)
    restored = await vdistream.restore(restorer, str(store), "sq", options=JOB)
    assert restored.ok, restored.error
    assert isinstance(restorer, SQLiteRestore)
    assert restorer.checked == "ok"
    assert sorted(p.name for p in target.parent.iterdir()) == ["app.db"]  # no temporaries
    assert database_info(target)["journal_mode"] == "wal"

    with sqlite3.connect(target) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        ids = [row[0] for row in db.execute("SELECT id FROM log ORDER BY id")]
        assert db.execute("SELECT count(*) FROM filler").fetchone() == (400,)
    db.close()
    # Exactly a committed prefix: every transaction committed before the copy started,
    # none half-done, none missing in between.
    k = len(ids)
    assert k > 0
    assert ids == list(range(1, k + 1))
    assert before <= k <= during
    # WAL mode: the writer was never blocked by the copy; it went on during the job.
    assert during > before


async def test_backup_of_a_rollback_journal_database(tmp_path: Path) -> None:
    path = tmp_path / "plain.db"
    make_database(path, wal=False, blobs=20)
    result = await backup_of(path, tmp_path / "store")
    assert result.ok, result.error
    target = tmp_path / "copy.db"
    restored = await vdistream.restore(
        restore_engine("sqlite", None, f"sqlite://{target}", OPTIONS),
        str(tmp_path / "store"),
        "sq",
        options=JOB,
    )
    assert restored.ok, restored.error
    assert database_info(target)["journal_mode"] == "rollback"
    assert integrity_check(target) == "ok"


async def test_existing_target_is_never_overwritten(tmp_path: Path) -> None:
    source = tmp_path / "src.db"
    make_database(source, blobs=5)
    assert (await backup_of(source, tmp_path / "store")).ok
    target = tmp_path / "out" / "target.db"
    target.parent.mkdir()
    target.write_bytes(b"precious data, not even a database")
    before = digest(target)

    result = await vdistream.restore(
        restore_engine("sqlite", None, str(target), OPTIONS),
        str(tmp_path / "store"),
        "sq",
        options=JOB,
    )
    assert not result.ok
    assert isinstance(result.error, TargetExistsError)
    assert str(target) in str(result.error)
    assert "already exists" in str(result.error)
    assert digest(target) == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["target.db"]

    # overwrite=True replaces it, once the restored file passed its check.
    result = await vdistream.restore(
        restore_engine("sqlite", None, str(target), OPTIONS, overwrite=True),
        str(tmp_path / "store"),
        "sq",
        options=JOB,
    )
    assert result.ok, result.error
    assert integrity_check(target) == "ok"
    assert sorted(p.name for p in target.parent.iterdir()) == ["target.db"]


async def test_a_stale_journal_beside_the_target_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "src.db"
    make_database(source, blobs=2)
    assert (await backup_of(source, tmp_path / "store")).ok
    target = tmp_path / "gone.db"
    stale = tmp_path / "gone.db-wal"
    stale.write_bytes(b"a WAL left by a deleted database")
    result = await vdistream.restore(
        restore_engine("sqlite", None, str(target), OPTIONS),
        str(tmp_path / "store"),
        "sq",
        options=JOB,
    )
    assert not result.ok
    assert isinstance(result.error, TargetExistsError)
    assert "-wal" in str(result.error)
    assert not target.exists()


async def test_missing_or_foreign_source_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.db"
    result = await backup_of(missing, tmp_path / "store")
    assert not result.ok
    assert isinstance(result.error, SQLiteError)
    assert str(missing) in str(result.error)
    assert tree(tmp_path) == {}

    foreign = tmp_path / "notes.txt"
    foreign.write_bytes(os.urandom(8192))
    result = await backup_of(foreign, tmp_path / "store", backup_id="foreign")
    assert not result.ok
    assert isinstance(result.error, SQLiteError)
    assert str(foreign) in str(result.error)
    assert "not a database" in str(result.error)
    assert sorted(tree(tmp_path)) == ["notes.txt"]


async def test_a_stream_that_is_no_database_is_not_put_in_place(tmp_path: Path) -> None:
    junk = resolve_source("cmd:head -c 100000 /dev/urandom").backup_engine(OPTIONS)
    assert (await vdistream.backup(junk, str(tmp_path / "store"), backup_id="j", options=JOB)).ok
    target = tmp_path / "out" / "x.db"
    target.parent.mkdir()
    result = await vdistream.restore(
        restore_engine("sqlite", None, str(target), OPTIONS),
        str(tmp_path / "store"),
        "j",
        options=JOB,
    )
    assert not result.ok
    assert isinstance(result.error, SQLiteError)
    assert "is not a SQLite database" in str(result.error)
    assert str(target) in str(result.error)
    assert list(target.parent.iterdir()) == []


async def test_content_check_of_sqlite(tmp_path: Path) -> None:
    source = tmp_path / "src.db"
    make_database(source, blobs=30)
    assert (await backup_of(source, tmp_path / "store")).ok
    workdir = tmp_path / "verify"
    workdir.mkdir()
    target, check = await content_check("sqlite", None, workdir)
    assert Path(target).parent == workdir
    result = await vdistream.restore(
        restore_engine("sqlite", None, target, OPTIONS), str(tmp_path / "store"), "sq", options=JOB
    )
    assert result.ok, result.error
    assert await check() == "integrity_check ok"

    # Damage the b-tree pages of the index: integrity_check finds it and says so.
    damage_root_pages(Path(target), ["log_note", "filler"])
    with pytest.raises(SQLiteError, match="fails integrity_check") as info:
        await check()
    assert target in str(info.value)


async def test_describe_a_sqlite_source(tmp_path: Path) -> None:
    path = tmp_path / "d.db"
    make_database(path, blobs=1)
    source = resolve_source(f"sqlite://{path}")
    info = await source.describe()
    assert info["kind"] == "sqlite"
    assert info["source"] == f"sqlite://{path}"
    assert info["journal_mode"] == "wal"
    assert info["sqlite_version"] == sqlite3.sqlite_version
    assert int(info["page_count"]) > 1
