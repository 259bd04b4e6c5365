"""What the review of the files mode found, each pinned by a test that fails without its
fix. Backup: a tablespace the server had not listed yet is copied, every timeline
history file is copied, a torn read of ``pg_control`` is read again. Restore: an entry
the manifest does not list (or lists with another kind, size, device or mode) writes
nothing, not even through a symlink of a delta restore's target; no set-uid files; a
delta restore leaves other clusters' version directories in a shared tablespace
location alone (and their owners) and, run as root, keeps the cluster's owner; a
failed restore gives an empty target its mode back; only root may give the files to
another user, refused before anything is written; a killed restore's files in a
tablespace location (its own owner lock) are swept by the next restore, also after a
real SIGKILL; a killed DELTA restore is never swept by a fresh one; no lock (whose
record would prove debris) is taken before the directory was found empty."""

from __future__ import annotations

import dataclasses
import json
import os
import pwd
import stat
import subprocess
import sys
import time
import uuid
import zlib
from pathlib import Path

import anyio
import pytest

from tests.databases.pgserver import PgServer, running_as_root
from tests.databases.test_pgfiles_restore import (
    OPTIONS,
    Item,
    encode,
    make_cluster,
    restore,
    scan,
    store,
    tree,
    with_tablespace,
)
from vdistream.engines import StreamFormatError
from vdistream.engines.pgfiles import pack
from vdistream.engines.pgfiles.backup import PgFilesBackup
from vdistream.engines.pgfiles.layout import EntryKind, FileRecord
from vdistream.engines.pgfiles.pgsession import BackupStart, BackupStop, ServerFacts
from vdistream.engines.pgfiles.restore import PgFilesRestore
from vdistream.engines.pgfiles.target import RestoreTarget
from vdistream.engines.pgfiles.walk import ItemKind, walk
from vdistream.engines.postgres import PostgresError
from vdistream.engines.scoped import EndpointError, TargetExistsError
from vdistream.ownership import OwnerLock

SEGMENT = 1 << 16


@pytest.fixture
def cluster(tmp_path: Path) -> Path:
    return make_cluster(tmp_path / "source")


# --- backup -----------------------------------------------------------------------------


def test_a_tablespace_link_the_server_did_not_list_is_copied(tmp_path: Path) -> None:
    # A tablespace created between the server's answer and the walk: its link's target
    # is its location (what pg_tablespace_location reads); an empty link would lose it.
    data, location = tmp_path / "data", tmp_path / "space"
    (data / "pg_tblspc").mkdir(parents=True)
    (location / "PG_15_1" / "5").mkdir(parents=True)
    (location / "PG_15_1" / "5" / "16500").write_bytes(b"rows")
    (location / "PG_16_2").mkdir()  # another cluster's: still not ours
    os.symlink(location, data / "pg_tblspc" / "16401")
    items = {item.path: item for item in walk(str(data), {}, version_dir="PG_15_1")}
    link = items["pg_tblspc/16401"]
    assert (link.kind, link.target) == (ItemKind.SYMLINK, str(location))
    assert items["pg_tblspc/16401/PG_15_1/5/16500"].kind is ItemKind.FILE
    assert items["pg_tblspc/16401/PG_15_1/5/16500"].source == str(
        location / "PG_15_1" / "5" / "16500"
    )
    assert not any(path.startswith("pg_tblspc/16401/PG_16_2") for path in items)


def test_every_timeline_history_file_is_copied(tmp_path: Path) -> None:
    # basebackup.c copies every history file: the backup's timeline's is what recovery
    # reads (a standby's timeline may change while the backup runs), the others are
    # small and what an operator reads after a switch.
    pg_wal = tmp_path / "pg_wal"
    pg_wal.mkdir()
    segments = ["000000030000000000000004", "000000030000000000000005"]
    for name in segments:
        (pg_wal / name).write_bytes(bytes(SEGMENT))
    (pg_wal / "000000030000000000000006").write_bytes(bytes(SEGMENT))  # not the backup's
    for name in ("00000002.history", "00000003.history"):
        (pg_wal / name).write_bytes(b"1\t0/3000000\tno recovery target specified\n")
    (pg_wal / "00000003.history.partial").write_bytes(b"x")
    facts = ServerFacts(150000, str(tmp_path), {}, SEGMENT, "1", 202209061)
    entries = PgFilesBackup._wal_entries(
        facts,
        BackupStart("0/40028", 3, "slot"),
        BackupStop("0/50100", b"LABEL", b""),
        segments,
    )
    paths = [entry.path for entry in entries]
    assert paths == [
        "backup_label",
        *(f"pg_wal/{name}" for name in segments),
        "pg_wal/00000002.history",
        "pg_wal/00000003.history",
    ]
    history = next(entry for entry in entries if entry.path == "pg_wal/00000002.history")
    assert history.size == (pg_wal / "00000002.history").stat().st_size


# --- restore ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_stream_entry_the_manifest_does_not_list_writes_nothing(
    tmp_path: Path, cluster: Path
) -> None:
    # A delta restore's target may hold a symlink the backup does not list (it is
    # removed only at the end): an entry below it would be written wherever it points.
    streams, records = encode(scan(cluster))
    target = tmp_path / "restored"
    await restore(streams, tmp_path / "store", PgFilesRestore(target, OPTIONS))
    outside = tmp_path / "outside"
    outside.mkdir()
    (target / "evil").symlink_to(outside)
    stowaway = Item(EntryKind.FILE, "evil/planted", b"stowaway", 0o600, 0)
    tampered, _ = encode(scan(cluster), extra=stowaway)
    engine = PgFilesRestore(target, OPTIONS, delta=True, expected=records)
    with pytest.raises(StreamFormatError, match=r"'evil/planted' is not in the backup's manifest"):
        await restore(tampered, tmp_path / "store2", engine)
    assert list(outside.iterdir()) == []


@pytest.mark.asyncio
async def test_a_stream_of_another_backup_is_refused_before_it_writes(
    tmp_path: Path, cluster: Path
) -> None:
    # Same paths, other sizes: refused at the first differing entry, for a fresh
    # restore as for a delta one (where what was written would stay).
    streams, records = encode(scan(cluster), backup_id=uuid.uuid4())
    (cluster / "base" / "1" / "1006").write_bytes(b"other")
    other, _ = encode(scan(cluster), backup_id=uuid.uuid4())
    target = tmp_path / "restored"
    await restore(streams, tmp_path / "store", PgFilesRestore(target, OPTIONS))
    before = (target / "base" / "1" / "1006").read_bytes()
    engine = PgFilesRestore(target, OPTIONS, delta=True, expected=records)
    with pytest.raises(StreamFormatError, match=r"is a file of .* the manifest lists a file"):
        await restore(other, tmp_path / "store2", engine)
    assert (target / "base" / "1" / "1006").read_bytes() == before


@pytest.mark.asyncio
async def test_a_delta_restore_leaves_other_clusters_in_a_tablespace_location(
    tmp_path: Path, cluster: Path
) -> None:
    items, location = with_tablespace(tmp_path, cluster)
    streams, records = encode(items)
    target = tmp_path / "restored"
    await restore(streams, tmp_path / "store", PgFilesRestore(target, OPTIONS, expected=records))
    theirs = location / "PG_16_202307071" / "5" / "1259"
    theirs.parent.mkdir(parents=True)
    theirs.write_bytes(b"another cluster's catalog")
    (location / "PG_15_202209061" / "5" / "stray").write_bytes(b"ours, not in the backup")
    engine = PgFilesRestore(target, OPTIONS, delta=True, expected=records)
    result = await restore(streams, tmp_path / "store2", engine)
    assert theirs.read_bytes() == b"another cluster's catalog"
    assert not (location / "PG_15_202209061" / "5" / "stray").exists()
    assert result.removed_paths == 1


@pytest.mark.asyncio
async def test_a_killed_restores_files_in_a_tablespace_location_are_removed(
    tmp_path: Path, cluster: Path
) -> None:
    items, location = with_tablespace(tmp_path, cluster)
    streams, records = encode(items)
    target = tmp_path / "restored"
    # what a restore killed with SIGKILL leaves: its locks (free, with a record) and
    # half of its files, in the directory and in the tablespace location
    for directory in (target, location):
        (directory / "half").mkdir(parents=True)
        (directory / "half" / "written").write_bytes(b"debris")
        lock = directory.with_name(f".{directory.name}.vdistream-restore.lock")
        lock.write_text('{"pid": 1}\n')
    await restore(streams, tmp_path / "store", PgFilesRestore(target, OPTIONS, expected=records))
    assert tree(location) == tree(tmp_path / "ts-source")
    assert not (target / "half").exists()
    assert not location.with_name(f".{location.name}.vdistream-restore.lock").exists()
    assert not target.with_name(f".{target.name}.vdistream-restore.lock").exists()


@pytest.mark.asyncio
async def test_a_failed_restore_gives_an_empty_target_its_mode_back(
    tmp_path: Path, cluster: Path
) -> None:
    streams, _ = encode(scan(cluster), corrupt="base/1/1007")
    target = tmp_path / "restored"
    target.mkdir()
    target.chmod(0o755)
    with pytest.raises(StreamFormatError, match="does not match its CRC-32"):
        await restore(streams, tmp_path / "store", PgFilesRestore(target, OPTIONS))
    assert list(target.iterdir()) == []
    assert stat.S_IMODE(target.stat().st_mode) == 0o755


@pytest.mark.asyncio
async def test_a_stream_cannot_plant_a_set_uid_file(tmp_path: Path, cluster: Path) -> None:
    (cluster / "base" / "1" / "1001").chmod(0o4755)
    (cluster / "empty").chmod(0o2750)
    streams, records = encode(scan(cluster))
    target = tmp_path / "restored"
    await restore(streams, tmp_path / "store", PgFilesRestore(target, OPTIONS, expected=records))
    assert stat.S_IMODE((target / "base" / "1" / "1001").stat().st_mode) == 0o755
    assert stat.S_IMODE((target / "empty").stat().st_mode) == 0o750
    # a delta restore that keeps the file in place gives it the same mode
    (target / "base" / "1" / "1001").chmod(0o600)
    engine = PgFilesRestore(target, OPTIONS, delta=True, expected=records)
    await restore(streams, tmp_path / "store2", engine)
    assert stat.S_IMODE((target / "base" / "1" / "1001").stat().st_mode) == 0o755


@pytest.mark.asyncio
@pytest.mark.skipif(not running_as_root(), reason="giving files to a user needs root")
async def test_the_owner_is_given_only_what_the_backup_put_in_a_tablespace_location(
    tmp_path: Path, cluster: Path
) -> None:
    items, location = with_tablespace(tmp_path, cluster)
    streams, records = encode(items)
    target = tmp_path / "restored"
    await restore(streams, tmp_path / "store", PgFilesRestore(target, OPTIONS, expected=records))
    theirs = location / "PG_16_202307071"
    theirs.mkdir()
    (theirs / "1259").write_bytes(b"another cluster's")
    engine = PgFilesRestore(target, OPTIONS, delta=True, expected=records, owner="postgres")
    await restore(streams, tmp_path / "store2", engine)
    postgres = pwd.getpwnam("postgres").pw_uid
    ours = location / "PG_15_202209061" / "5" / "16401"
    assert (location.stat().st_uid, ours.stat().st_uid) == (postgres, postgres)
    assert (theirs.stat().st_uid, (theirs / "1259").stat().st_uid) == (0, 0)


def test_only_root_may_give_the_restore_to_another_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Refused before anything is created, not after every byte was written.
    monkeypatch.setattr(os, "geteuid", lambda: 54321)
    target = RestoreTarget(tmp_path / "restored", owner="postgres")
    with pytest.raises(EndpointError, match="only root can give the restored files to user"):
        target.prepare()
    assert not (tmp_path / "restored").exists()


@pytest.mark.asyncio
async def test_a_stream_entry_with_another_mode_than_the_manifest_is_refused(
    tmp_path: Path, cluster: Path
) -> None:
    # A world-writable database file, given to postgres, is anyone's to change.
    (cluster / "base" / "1" / "1003").chmod(0o666)
    streams, records = encode(scan(cluster))
    listed = [dataclasses.replace(r, mode=0o600) if r.path == "base/1/1003" else r for r in records]
    target = tmp_path / "restored"
    engine = PgFilesRestore(target, OPTIONS, expected=listed)
    with pytest.raises(StreamFormatError, match=r"'base/1/1003' has mode 0666, the manifest"):
        await restore(streams, tmp_path / "store", engine)
    assert not target.exists()


# --- pg_control, rewritten in place by every checkpoint -----------------------------------


def test_the_control_file_check_knows_postgresqls_layout(pg: PgServer) -> None:
    control = (pg.data / "global" / "pg_control").read_bytes()
    assert pack.control_crc_ok(control)
    torn = bytearray(control)
    torn[40] ^= 0x01  # a checkpoint's new location over the old CRC
    assert not pack.control_crc_ok(bytes(torn))


def test_a_torn_read_of_the_control_file_is_read_again(
    pg: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    control = (pg.data / "global" / "pg_control").read_bytes()
    torn = bytearray(control)
    torn[40] ^= 0x01
    source = tmp_path / "pg_control"
    source.write_bytes(torn)  # what a read that met the server's write saw
    reads = [bytes(torn), control]  # ... and the read after it

    def read_whole(path: str, size: int) -> bytes:
        assert (path, size) == (str(source), len(control))
        return reads.pop(0)

    monkeypatch.setattr(pack, "_read_whole", read_whole)
    entry = pack.Entry(EntryKind.FILE, "global/pg_control", len(control), 0o600, 1, str(source))
    packer = pack.Packer(0)
    packer.buffer, packer.filled = memoryview(bytearray(4 * len(control))), 0
    assert not packer.fill([pack.WorkList([entry])])
    (record,) = packer.records
    assert record.crc32 == zlib.crc32(control)
    assert bytes(packer.buffer[packer.filled - 4 - len(control) : packer.filled - 4]) == control


def test_a_control_file_that_keeps_changing_fails_and_a_stable_one_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "pg_control"
    source.write_bytes(b"\x07" * 8192)  # stable, no known layout: kept as read
    assert pack.read_control(str(source), 8192) == b"\x07" * 8192
    counter = iter(range(1000))
    monkeypatch.setattr(
        pack, "_read_whole", lambda path, size: next(counter).to_bytes(8, "little") * 1024
    )
    with pytest.raises(PostgresError, match=r"pg_control kept changing while it was read"):
        pack.read_control(str(source), 8192)


# --- a restore killed with SIGKILL ----------------------------------------------------------

_KILLED_RESTORE = """
import json, sys, anyio, vdistream
from vdistream.engines import StripingOptions
from vdistream.engines.faults import Action, FailPoint, Phase
from vdistream.engines.pgfiles.layout import FileRecord
from vdistream.engines.pgfiles.restore import PgFilesRestore

records = [FileRecord.from_json(row) for row in json.load(open(sys.argv[3]))]

async def main():
    engine = PgFilesRestore(
        sys.argv[2],
        StripingOptions(block_size=4096, max_transfer_size=65536),
        expected=records,
        delta=sys.argv[4:] == ["delta"],
        fail_at=FailPoint(Phase.MID_STREAM, Action.STALL, after_bytes=3 * 65536),
    )
    await vdistream.restore(engine, sys.argv[1], "b",
                            options=vdistream.JobOptions(devices=4, stall_timeout=3600))

anyio.run(main)
"""


def test_a_restore_killed_with_sigkill_is_swept_by_the_next_one(
    tmp_path: Path, cluster: Path
) -> None:
    items, location = with_tablespace(tmp_path, cluster)
    streams, records = encode(items)
    storage = store(streams, tmp_path / "store")
    listing = tmp_path / "records.json"
    listing.write_text(json.dumps([record.to_json() for record in records]))
    target = tmp_path / "restored"
    locks = [d.with_name(f".{d.name}.vdistream-restore.lock") for d in (target, location)]
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_RESTORE, str(storage), str(target), str(listing)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    try:
        deadline = time.monotonic() + 60
        while not (locks[0].exists() and _files(target) and _files(location)):
            assert child.poll() is None, "the restore ended before it was killed"
            assert time.monotonic() < deadline, "the restore never wrote a file"
            time.sleep(0.05)  # a child process has no event to wait for
    finally:
        child.kill()
        child.wait(timeout=60)
    assert not (target / "global" / "pg_control").exists()  # never startable half-way
    engine = PgFilesRestore(target, OPTIONS, expected=records)
    anyio.run(restore, streams, tmp_path / "store2", engine)
    assert tree(location) == tree(tmp_path / "ts-source")
    assert (target / "PG_VERSION").read_bytes() == (cluster / "PG_VERSION").read_bytes()
    assert not any(lock.exists() for lock in locks)


def _files(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.is_file()] if root.is_dir() else []


@pytest.mark.asyncio
@pytest.mark.skipif(not running_as_root(), reason="files of another user need root")
async def test_a_delta_restore_as_root_keeps_the_clusters_owner(
    tmp_path: Path, cluster: Path
) -> None:
    # Files root rewrote for postgres' cluster, left root's, would stop it from starting.
    streams, records = encode(scan(cluster))
    target = tmp_path / "restored"
    postgres = pwd.getpwnam("postgres")
    engine = PgFilesRestore(target, OPTIONS, expected=records, owner="postgres")
    await restore(streams, tmp_path / "store", engine)
    (target / "base" / "1" / "1008").write_bytes(b"changed")
    (target / "global" / "2007").unlink()
    engine = PgFilesRestore(target, OPTIONS, delta=True, expected=records)
    result = await restore(streams, tmp_path / "store2", engine)
    assert result.written_files == 3  # the two files and pg_control
    owners = {path.lstat().st_uid for path in [target, *target.rglob("*")]}
    assert owners == {postgres.pw_uid}


def test_a_killed_delta_restore_is_never_swept_by_a_fresh_one(
    tmp_path: Path, cluster: Path
) -> None:
    # What a killed delta restore leaves is a cluster being corrected (and, in a shared
    # tablespace location, other clusters' files): a fresh restore must refuse it as
    # not empty, not sweep it as a killed fresh restore's debris.
    items, location = with_tablespace(tmp_path, cluster)
    streams, records = encode(items)
    target = tmp_path / "restored"
    first = PgFilesRestore(target, OPTIONS, expected=records)
    anyio.run(restore, streams, tmp_path / "store", first)
    theirs = location / "PG_16_202307071"
    theirs.mkdir()
    (theirs / "1259").write_bytes(b"another cluster's")
    storage = store(streams, tmp_path / "store2")
    listing = tmp_path / "records.json"
    listing.write_text(json.dumps([record.to_json() for record in records]))
    argv = [str(storage), str(target), str(listing), "delta"]
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_RESTORE, *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    try:
        deadline = time.monotonic() + 60
        while (target / "global" / "pg_control").exists():  # the delta restore's first step
            assert child.poll() is None, "the restore ended before it was killed"
            assert time.monotonic() < deadline, "the delta restore never started"
            time.sleep(0.05)  # a child process has no event to wait for
    finally:
        child.kill()
        child.wait(timeout=60)
    fresh = PgFilesRestore(target, OPTIONS, expected=records)
    with pytest.raises(TargetExistsError, match="is not empty"):
        anyio.run(restore, streams, tmp_path / "store3", fresh)
    assert (target / "PG_VERSION").read_bytes() == (cluster / "PG_VERSION").read_bytes()
    assert (theirs / "1259").read_bytes() == b"another cluster's"
    # the next delta restore corrects it
    engine = PgFilesRestore(target, OPTIONS, delta=True, expected=records)
    anyio.run(restore, streams, tmp_path / "store4", engine)
    assert (target / "global" / "pg_control").exists()
    assert (theirs / "1259").read_bytes() == b"another cluster's"


def test_no_lock_is_taken_beside_a_directory_that_is_not_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A restore killed between taking its lock and looking into the directory would
    # leave a record that makes the next restore sweep someone's files: the look
    # comes first.
    taken: list[Path] = []
    take = OwnerLock.take

    def spy(path: Path, **kwargs: int) -> OwnerLock:
        taken.append(Path(path))
        return take(path, **kwargs)

    monkeypatch.setattr(OwnerLock, "take", spy)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "someone's").write_text("data")
    with pytest.raises(TargetExistsError, match="is not empty"):
        RestoreTarget(busy).prepare()
    assert taken == []
    location = tmp_path / "space"
    location.mkdir()
    (location / "PG_16_1").mkdir()
    link = FileRecord("pg_tblspc/16400", EntryKind.SYMLINK, 0, 0, 0, 0o777, 0, str(location))
    with pytest.raises(TargetExistsError, match=r"tablespace location .* is not empty"):
        RestoreTarget(tmp_path / "fresh", records=[link]).prepare()
    assert taken == [tmp_path / ".fresh.vdistream-restore.lock"]
    assert (location / "PG_16_1").is_dir()


@pytest.mark.asyncio
async def test_tablespaces_can_be_restored_under_a_directory_of_their_own(
    tmp_path: Path, cluster: Path
) -> None:
    # What verify needs: its restore must stay inside its work directory, never touch
    # (or create) the recorded locations, which on the database host are the live ones.
    items, location = with_tablespace(tmp_path, cluster)
    streams, records = encode(items)
    target, under = tmp_path / "work" / "pgdata", tmp_path / "work" / "tablespaces"
    engine = PgFilesRestore(target, OPTIONS, expected=records, tablespaces_under=under)
    await restore(streams, tmp_path / "store", engine)
    assert os.readlink(target / "pg_tblspc" / "16400") == str(under / "16400")
    assert tree(under / "16400") == tree(tmp_path / "ts-source")
    assert not location.exists()
    odd = [FileRecord("pg_tblspc/..", EntryKind.SYMLINK, 0, 0, 0, 0o777, 0, str(location))]
    with pytest.raises(EndpointError, match=r"the manifest lists a tablespace 'pg_tblspc/\.\.'"):
        RestoreTarget(tmp_path / "other", records=odd, tablespaces_under=under)
