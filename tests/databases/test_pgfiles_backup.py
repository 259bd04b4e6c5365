"""PostgreSQL's ``files`` mode, backup side, against the real server of the test run.

The backup goes through 4 devices into files; a small parser of the format
(``vdistream.engines.pgfiles.layout``), written here from its docstring, reads every
stream back and checks framing, CRCs, the index and the bytes of every file that did
not change since, against the data directory. The server is left with no slot and no
session of ours after a backup, failed or not. ``walk`` is checked on a copy of a real
data directory with every kind of thing a backup must skip added to it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pwd
import shutil
import struct
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import vdistream
from tests.databases.conftest import OPTIONS
from tests.databases.pgserver import PgCluster, PgServer, running_as_root
from vdistream.engines import StripingOptions
from vdistream.engines.faults import Action, FailPoint, Phase
from vdistream.engines.framing import StreamHeader, StreamTrailer, crc32
from vdistream.engines.pgfiles import pack
from vdistream.engines.pgfiles.backup import PgFilesBackup, PgFilesResult, check_readable
from vdistream.engines.pgfiles.layout import (
    FLAG_FILES,
    FLAG_PADDED,
    FOOTER,
    HEADER_SIZE,
    INDEX_PATH,
    BackupIndex,
    EntryHeader,
    EntryKind,
    FileRecord,
)
from vdistream.engines.pgfiles.pgsession import ServerFacts, wal_segment_names
from vdistream.engines.pgfiles.walk import ItemKind, walk
from vdistream.engines.postgres import PostgresError

JOB = vdistream.JobOptions(devices=4)
SEGMENT = 16 * 1024 * 1024


# --- a reader of the format, from layout.py's docstring ---------------------------------


@dataclasses.dataclass(frozen=True)
class Entry:
    header: EntryHeader
    data: bytes
    crc: int
    device: int


@dataclasses.dataclass(frozen=True)
class Parsed:
    entries: list[Entry]
    index: BackupIndex
    headers: list[StreamHeader]
    trailers: list[StreamTrailer]


def parse_stream(
    data: bytes, block: int, device: int
) -> tuple[StreamHeader, StreamTrailer, list[Entry]]:
    header = StreamHeader.unpack(data[:block])
    trailer = StreamTrailer.unpack(data[-block:])
    payload = data[block:-block]
    assert header.flags & FLAG_FILES
    assert header.device_index == device
    assert trailer.payload_length == len(payload)
    assert trailer.payload_length % block == 0
    assert crc32(payload) == trailer.payload_crc32
    end = trailer.total_length
    assert payload[end:] == bytes(len(payload) - end)
    entries = parse_entries(payload, end, device)
    assert len(entries) == trailer.chunk_count
    return header, trailer, entries


def parse_entries(payload: bytes, end: int, device: int) -> list[Entry]:
    entries = []
    pos = 0
    while pos < end:
        head = payload[pos : pos + HEADER_SIZE]
        length = EntryHeader.path_length(head)
        path = payload[pos + HEADER_SIZE : pos + HEADER_SIZE + length]
        parsed = EntryHeader.unpack(head, path)
        start = pos + HEADER_SIZE + length
        body = payload[start : start + parsed.size]
        (crc,) = FOOTER.unpack_from(payload, start + parsed.size)
        assert crc == (crc32(body) if body else 0), parsed.path
        entries.append(Entry(parsed, body, crc, device))
        pos = start + parsed.size + FOOTER.size
    assert pos == end
    return entries


def parse_backup(store: Path, result: vdistream.JobResult, block: int) -> Parsed:
    headers, trailers, entries = [], [], []
    for index, device in enumerate(result.devices):
        header, trailer, found = parse_stream((store / device.key).read_bytes(), block, index)
        headers.append(header)
        trailers.append(trailer)
        entries.extend(found)
    assert len({h.backup_id for h in headers}) == 1
    index_entries = [e for e in entries if e.header.kind is EntryKind.INDEX]
    assert len(index_entries) == 1
    last = [e for e in entries if e.device == 0][-1]
    assert last.header.kind is EntryKind.INDEX
    assert last.header.path == INDEX_PATH.encode()
    return Parsed(entries, BackupIndex.from_bytes(last.data), headers, trailers)


# --- fixtures ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Taken:
    store: Path
    result: vdistream.JobResult
    engine_result: PgFilesResult
    parsed: Parsed
    taken_at: int  # time.time_ns() when the backup ended


def take(pg: PgServer, store: Path, options: StripingOptions = OPTIONS) -> Taken:
    engine = PgFilesBackup(pg.url(), options)

    async def main() -> vdistream.JobResult:
        return await vdistream.backup(engine, str(store), backup_id="pgfiles", options=JOB)

    result = anyio.run(main)
    assert result.ok, result.error
    engine_result = result.engine_result
    assert isinstance(engine_result, PgFilesResult)
    parsed = parse_backup(store, result, options.block_size)
    return Taken(store, result, engine_result, parsed, time.time_ns())


@pytest.fixture(scope="module")
def taken(pg: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Taken:
    return take(pg, tmp_path_factory.mktemp("pgfiles"))


def ours(pg: PgServer) -> tuple[str, str]:
    """(vdistream slots, vdistream sessions) the server knows of, once our session left."""
    slots = sessions = ""
    for _ in range(200):  # the backend exits a moment after the socket closed
        slots = pg.psql(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'vdistream%'"
        )
        sessions = pg.psql(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'vdistream'"
        )
        if slots == sessions == "0":
            break
        time.sleep(0.05)
    return slots, sessions


# --- the backup ----------------------------------------------------------------------


def test_the_streams_hold_every_file_with_its_bytes(pg: PgServer, taken: Taken) -> None:
    parsed, info = taken.parsed, taken.engine_result.postgresql
    data = pg.data
    files = [e for e in parsed.entries if e.header.kind is EntryKind.FILE]
    by_path = {e.header.path.decode(): e for e in parsed.entries}
    assert len(by_path) == len(parsed.entries)  # no entry twice
    # every device carries files (each takes the next largest when it is free)
    assert {entry.device for entry in files} == {0, 1, 2, 3}
    checked = 0
    for entry in files:
        path = entry.header.path.decode()
        if path.startswith("pg_wal/") or path == "backup_label":
            continue
        source = data / path
        stat = source.stat()
        if stat.st_mtime_ns != entry.header.mtime_ns or stat.st_size != entry.header.size:
            continue  # written since: WAL replay's business
        assert source.read_bytes() == entry.data, path
        checked += 1
    assert checked > 0.9 * len(files)
    assert (data / "PG_VERSION").read_bytes() == by_path["PG_VERSION"].data
    # pgbench_accounts is the largest file of all and came first on its device
    largest = max(files, key=lambda e: e.header.size)
    assert largest.header.path.startswith(b"base/")
    assert info["file_count"] == len(parsed.entries) - 1
    assert taken.engine_result.logical_bytes == info["data_bytes"]
    assert info["data_bytes"] == sum(e.header.size for e in parsed.entries) - len(
        next(e for e in parsed.entries if e.header.kind is EntryKind.INDEX).data
    )


def test_the_index_lists_every_entry(taken: Taken) -> None:
    parsed, info = taken.parsed, taken.engine_result.postgresql
    listed = {r.path: r for r in parsed.index.records}
    stored = [e for e in parsed.entries if e.header.kind is not EntryKind.INDEX]
    assert len(listed) == len(stored) == len(parsed.index.records)
    for entry in stored:
        record = listed[entry.header.path.decode()]
        assert (record.kind, record.size, record.crc32, record.device) == (
            entry.header.kind,
            entry.header.size,
            entry.crc,
            entry.device,
        )
        assert (record.mode, record.mtime_ns) == (entry.header.mode, entry.header.mtime_ns)
    assert [FileRecord.from_json(row) for row in info["files"]] == list(parsed.index.records)
    assert parsed.index.start_lsn == info["start_lsn"]
    assert parsed.index.stop_lsn == info["stop_lsn"]
    assert parsed.index.system_identifier == info["system_identifier"]
    assert parsed.index.server_version >= 150000
    assert parsed.index.backup_id == str(parsed.headers[0].backup_id)
    # directories and links come first, on device 0
    kinds = [e.header.kind for e in parsed.entries if e.device == 0]
    first_file = kinds.index(EntryKind.FILE)
    assert EntryKind.DIRECTORY in kinds[:first_file]
    assert EntryKind.DIRECTORY not in kinds[first_file:]


def test_backup_label_and_wal(pg: PgServer, taken: Taken) -> None:
    parsed, info = taken.parsed, taken.engine_result.postgresql
    by_path = {e.header.path.decode(): e for e in parsed.entries}
    label = by_path["backup_label"].data.decode()
    assert f"START WAL LOCATION: {info['start_lsn']}" in label
    assert f"LABEL: vdistream {parsed.headers[0].backup_id}" in label
    assert "BACKUP METHOD: streamed" in label
    assert "tablespace_map" not in by_path  # no tablespaces
    wal = wal_segment_names(info["start_lsn"], info["stop_lsn"], info["timeline"], SEGMENT)
    assert info["wal"] == wal
    assert list(parsed.index.wal) == wal
    assert wal[0] in label
    for name in wal:
        entry = by_path[f"pg_wal/{name}"]
        assert entry.header.size == SEGMENT
        assert entry.data[:2] != b"\0\0"  # a WAL page header (magic) starts it
    # the rest of pg_wal is not copied; the directories are there
    assert {p for p in by_path if p.startswith("pg_wal")} == {
        "pg_wal",
        "pg_wal/archive_status",
        *(f"pg_wal/{name}" for name in wal),
    }
    assert by_path["pg_wal"].header.kind is EntryKind.DIRECTORY


def test_skipped_things_are_not_in_the_backup(taken: Taken) -> None:
    paths = {e.header.path.decode() for e in taken.parsed.entries}
    for name in ("postmaster.pid", "postmaster.opts", "backup_manifest"):
        assert name not in paths
    for directory in ("pg_stat_tmp", "pg_replslot", "pg_subtrans", "pg_notify"):
        assert directory in paths
        assert not [p for p in paths if p.startswith(directory + "/")]
    assert not [p for p in paths if "pgsql_tmp" in p or p.endswith("pg_internal.init")]


def test_nothing_is_left_on_the_server(pg: PgServer, taken: Taken) -> None:
    # the session that held the backup and the temporary slot is gone: PostgreSQL
    # aborts a non-exclusive backup and drops the slot when that session ends
    assert ours(pg) == ("0", "0")


def test_an_aborted_backup_leaves_no_slot_no_backup_and_no_stream(
    pg: PgServer, tmp_path: Path
) -> None:
    engine = PgFilesBackup(
        pg.url(), OPTIONS, fail_at=FailPoint(Phase.MID_STREAM, Action.RAISE, after_commands=12)
    )

    async def main() -> vdistream.JobResult:
        return await vdistream.backup(engine, str(tmp_path), backup_id="aborted", options=JOB)

    result = anyio.run(main)
    assert not result.ok
    assert "injected fault" in str(result.error)
    assert ours(pg) == ("0", "0")
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix == ".vdi"]


def test_a_cancelled_backup_leaves_nothing_on_the_server(pg: PgServer, tmp_path: Path) -> None:
    engine = PgFilesBackup(
        pg.url(), OPTIONS, fail_at=FailPoint(Phase.MID_STREAM, Action.STALL, after_commands=12)
    )

    seen = []

    async def main() -> None:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(
                    functools.partial(
                        vdistream.backup, engine, str(tmp_path), backup_id="stalled", options=JOB
                    )
                )
                # the slot exists while the backup runs
                while not await anyio.to_thread.run_sync(slot_exists, pg):  # noqa: ASYNC110
                    await anyio.sleep(0.05)  # the server has no event to wait for
                seen.append(True)
                tasks.cancel_scope.cancel()

    anyio.run(main)
    assert seen
    assert ours(pg) == ("0", "0")


def slot_exists(pg: PgServer) -> bool:
    return (
        pg.psql(
            "SELECT count(*) FROM pg_replication_slots"
            " WHERE slot_name LIKE 'vdistream%' AND temporary"
        )
        == "1"
    )


def failed_backup(url: str, tmp_path: Path) -> vdistream.JobResult:
    async def main() -> vdistream.JobResult:
        engine = PgFilesBackup(url, OPTIONS)
        return await vdistream.backup(engine, str(tmp_path), backup_id="nope", options=JOB)

    result = anyio.run(main)
    assert not result.ok
    assert isinstance(result.error, PostgresError)
    assert "\n" not in str(result.error)
    return result


def test_a_refused_connection_names_the_server_not_the_password(tmp_path: Path) -> None:
    result = failed_backup(
        f"postgresql://postgres:s3cret@/postgres?host={tmp_path}&port=1", tmp_path
    )
    assert "cannot connect to postgresql://postgres@/postgres" in str(result.error)
    assert "s3cret" not in str(result.error)
    assert not list(tmp_path.rglob("*.vdi"))


def test_a_role_without_backup_privileges_is_refused(pg: PgServer, tmp_path: Path) -> None:
    role = f"plain_{uuid.uuid4().hex[:8]}"
    pg.psql(f"CREATE ROLE {role} LOGIN")
    url = pg.url().replace("postgresql://postgres@", f"postgresql://{role}@")
    result = failed_backup(url, tmp_path)
    assert "may not take a backup" in str(result.error)
    assert "REPLICATION" in str(result.error)
    assert ours(pg) == ("0", "0")


# --- refusals before the set opens ---------------------------------------------------


def facts_of(pg: PgServer, data: str | None = None) -> ServerFacts:
    return ServerFacts(
        server_version=150000,
        data_directory=data or str(pg.data),
        tablespaces={},
        wal_segment_size=SEGMENT,
        system_identifier=pg.psql("SELECT system_identifier FROM pg_control_system()"),
        catalog_version=0,
    )


def test_a_data_directory_elsewhere_is_refused(pg: PgServer, tmp_path: Path) -> None:
    with pytest.raises(PostgresError, match="does not exist on this host: vdistream must run on"):
        check_readable(facts_of(pg, str(tmp_path / "absent")))
    other = tmp_path / "other"
    (other / "global").mkdir(parents=True)
    (other / "global" / "pg_control").write_bytes(struct.pack("<Q", 42) + bytes(100))
    with pytest.raises(PostgresError, match="belongs to another cluster"):
        check_readable(facts_of(pg, str(other)))
    check_readable(facts_of(pg))  # root reads the real one


@pytest.mark.skipif(not running_as_root(), reason="needs another uid to be refused")
def test_an_unreadable_data_directory_is_refused_with_advice(pg: PgServer) -> None:
    facts = facts_of(pg)
    nobody = pwd.getpwnam("nobody")
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        os.close(read)
        try:
            os.setgroups([])
            os.setresgid(nobody.pw_gid, nobody.pw_gid, nobody.pw_gid)
            os.setresuid(nobody.pw_uid, nobody.pw_uid, nobody.pw_uid)
            check_readable(facts)
            message = "no error"
        except PostgresError as exc:
            message = str(exc)
        except BaseException as exc:
            message = f"{type(exc).__name__}: {exc}"
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(child, 0)
    assert message.startswith(f"cannot read {pg.data}")
    assert "run vdistream as the server's user (postgres)" in message
    assert "initdb -g" in message
    assert "\n" not in message


# --- walk ----------------------------------------------------------------------------


@pytest.fixture
def data_copy(pg: PgServer, tmp_path: Path) -> Path:
    """A copy of the live data directory with every kind of skipped thing added."""
    copy = tmp_path / "data"
    shutil.copytree(pg.data, copy, symlinks=True, ignore_dangling_symlinks=True)
    return copy


def test_walk_skips_what_postgresql_says_to_skip(data_copy: Path, tmp_path: Path) -> None:
    d = data_copy
    database = next(p for p in (d / "base").iterdir() if p.name.isdigit())
    made = {
        "postmaster.opts": b"x",
        "postgresql.auto.conf.tmp": b"x",
        "current_logfiles": b"x",
        "backup_label": b"x",
        "tablespace_map": b"x",
        "backup_manifest": b"x",
        "pg_wal/000000010000000000000099": b"x",
        "pg_wal/archive_status/000000010000000000000099.done": b"",
        "pg_replslot/slot/state": b"x",
        "pg_stat_tmp/global.stat": b"x",
        "pg_snapshots/0001": b"x",
        "pg_dynshmem/mmap.1": b"x",
        "base/pgsql_tmp/pgsql_tmp123.0": b"x",
        f"{database.relative_to(d)}/pgsql_tmp77": b"x",
        "global/pg_internal.init": b"x",
        f"{database.relative_to(d)}/pg_internal.init.1234": b"x",
        f"{database.relative_to(d)}/99999_init": b"keep",
        f"{database.relative_to(d)}/99999": b"skip",
        f"{database.relative_to(d)}/99999_fsm": b"skip",
        f"{database.relative_to(d)}/99999.1": b"skip",
        f"{database.relative_to(d)}/t3_88888": b"skip",
        f"{database.relative_to(d)}/88888": b"keep",
    }
    for name, content in made.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(content)
    os.mkfifo(d / "a_fifo")
    os.symlink("/etc/hostname", d / "a_link")
    location = tmp_path / "space"
    (location / "PG_15_1").mkdir(parents=True)
    (location / "PG_15_1" / "5").mkdir()
    (location / "PG_15_1" / "5" / "77777").write_bytes(b"table")
    (location / "PG_15_1" / "5" / "77777_init").write_bytes(b"init")
    (location / "PG_15_1" / "5" / "77778").write_bytes(b"table")
    (location / "PG_15_1" / "5" / "77778_init").write_bytes(b"init")
    (location / "PG_16_2").mkdir()  # another cluster's
    (location / "PG_16_2" / "x").write_bytes(b"not ours")
    os.symlink(location, d / "pg_tblspc" / "16400")

    items = walk(str(d), {16400: str(location)}, version_dir="PG_15_1")
    paths = {item.path: item for item in items}
    rel = str(database.relative_to(d))
    for skipped in [
        "postmaster.pid",
        "postmaster.opts",
        "postgresql.auto.conf.tmp",
        "current_logfiles",
        "backup_label",
        "tablespace_map",
        "backup_manifest",
        "pg_wal/000000010000000000000099",
        "pg_wal/archive_status/000000010000000000000099.done",
        "pg_replslot/slot",
        "pg_stat_tmp/global.stat",
        "pg_snapshots/0001",
        "pg_dynshmem/mmap.1",
        "base/pgsql_tmp",
        f"{rel}/pgsql_tmp77",
        "global/pg_internal.init",
        f"{rel}/pg_internal.init.1234",
        f"{rel}/99999",
        f"{rel}/99999_fsm",
        f"{rel}/99999.1",
        f"{rel}/t3_88888",
        "a_fifo",
        "pg_tblspc/16400/PG_16_2",
        "pg_tblspc/16400/PG_15_1/5/77777",
    ]:
        assert skipped not in paths, skipped
    for kept in [
        "PG_VERSION",
        "global/pg_control",
        "pg_wal",
        "pg_wal/archive_status",
        "pg_replslot",
        "pg_stat_tmp",
        "pg_subtrans",
        "pg_notify",
        "pg_serial",
        "pg_snapshots",
        "pg_dynshmem",
        f"{rel}/99999_init",
        f"{rel}/88888",
        "pg_tblspc/16400/PG_15_1/5/77777_init",
        "pg_tblspc/16400/PG_15_1/5",
    ]:
        assert kept in paths, kept
    assert paths["pg_tblspc/16400"].kind is ItemKind.SYMLINK
    assert paths["pg_tblspc/16400"].target == str(location)
    assert paths["a_link"].kind is ItemKind.SYMLINK
    assert paths["a_link"].target == "/etc/hostname"
    assert paths["pg_tblspc/16400/PG_15_1"].kind is ItemKind.DIRECTORY
    assert paths["pg_wal/archive_status"].kind is ItemKind.DIRECTORY
    # order: the tree first (each directory before what it holds), then files largest first
    kinds = [item.kind for item in items]
    first_file = kinds.index(ItemKind.FILE)
    assert ItemKind.FILE not in {k for k in kinds[:first_file]}
    assert set(kinds[first_file:]) == {ItemKind.FILE}
    sizes = [item.size for item in items[first_file:]]
    assert sizes == sorted(sizes, reverse=True)
    seen: set[str] = set()
    for item in items[:first_file]:
        parent = item.path.rpartition("/")[0]
        assert not parent or parent in seen, item.path
        seen.add(item.path)


def test_walk_of_a_live_data_directory_matches_the_files(pg: PgServer) -> None:
    items = walk(str(pg.data))
    files = {item.path for item in items if item.kind is ItemKind.FILE}
    assert "global/pg_control" in files
    assert "postmaster.pid" not in files
    assert sum(item.size for item in items if item.kind is ItemKind.FILE) > 20_000_000


# --- a tablespace, on a server of its own --------------------------------------------


@pytest.fixture(scope="module")
def spaced(pg_cluster: PgCluster) -> Iterator[tuple[PgServer, Path]]:
    """A second server with a table in a tablespace (a basebackup to stdout refuses
    tablespaces, so the shared server stays without)."""
    server = pg_cluster.initdb(f"spaced-{uuid.uuid4().hex[:6]}")
    server.start()
    location = pg_cluster.directory(f"space-{uuid.uuid4().hex[:6]}")
    server.psql(f"CREATE TABLESPACE extra LOCATION '{location}'")
    server.psql("CREATE TABLE t (n int) TABLESPACE extra")
    server.psql("INSERT INTO t SELECT generate_series(1, 10000)")
    server.psql("CHECKPOINT")
    try:
        yield server, location
    finally:
        server.stop()


def test_a_tablespace_is_a_link_and_its_files(
    spaced: tuple[PgServer, Path], tmp_path: Path
) -> None:
    server, location = spaced
    taken = take(server, tmp_path)
    info = taken.engine_result.postgresql
    oid = server.psql("SELECT oid FROM pg_tablespace WHERE spcname = 'extra'")
    assert info["tablespaces"] == {oid: str(location)}
    by_path = {e.header.path.decode(): e for e in taken.parsed.entries}
    link = by_path[f"pg_tblspc/{oid}"]
    assert link.header.kind is EntryKind.SYMLINK
    assert link.data == os.fsencode(str(location))
    relation = server.psql("SELECT pg_relation_filepath('t')")
    assert relation.startswith(f"pg_tblspc/{oid}/PG_15_")
    entry = by_path[relation]
    assert entry.header.kind is EntryKind.FILE
    assert entry.header.size > 0
    assert entry.data == (location / relation.split("/", 2)[2]).read_bytes()
    spcmap = by_path["tablespace_map"].data.decode()
    assert spcmap.strip() == f"{oid} {location}"
    assert ours(server) == ("0", "0")


# --- packing: files that changed while the backup read them ---------------------------


def test_packing_files_that_shrank_grew_or_vanished(tmp_path: Path) -> None:
    content = {name: os.urandom(size) for name, size in [("big", 20000), ("shrunk", 4000)]}
    content["grew"] = os.urandom(5000)
    content["empty"] = b""
    for name, data in content.items():
        (tmp_path / name).write_bytes(data)
    listed = {"big": 20000, "shrunk": 10000, "grew": 100, "gone": 3000, "empty": 0}

    def entry(name: str) -> pack.Entry:
        return pack.Entry(
            EntryKind.FILE, f"base/1/{name}", listed[name], 0o600, 7, str(tmp_path / name)
        )

    work = pack.WorkList([entry(n) for n in ("big", "shrunk", "grew", "gone", "empty")])
    label = pack.WorkList([pack.Entry.memory("backup_label", b"LABEL")])
    packer = pack.Packer(2)
    payload = bytearray()
    buffer = memoryview(bytearray(4096))
    for sources in ([work], [label]):
        while True:
            if packer.buffer is None:
                packer.buffer, packer.filled = buffer, 0
            full = packer.fill(sources)
            if not full:
                break
            payload += buffer
            packer.buffer = None
    size = packer.finish(512)
    payload += buffer[:size]
    packer.close()
    assert packer.payload == len(payload)
    assert packer.crc == crc32(payload)
    entries = {e.header.path.decode(): e for e in parse_entries(bytes(payload), packer.total, 2)}
    assert packer.entries == len(entries) == 5
    assert "base/1/gone" not in entries  # vanished before it was opened: not listed
    assert entries["base/1/big"].data == content["big"]
    shrunk = entries["base/1/shrunk"]
    assert shrunk.header.flags & FLAG_PADDED
    assert shrunk.data == content["shrunk"] + bytes(6000)
    assert entries["base/1/grew"].data == content["grew"][:100]
    assert not entries["base/1/grew"].header.flags & FLAG_PADDED
    assert entries["base/1/empty"].data == b""
    assert entries["backup_label"].data == b"LABEL"
    records = {r.path: r for r in packer.records}
    assert set(records) == set(entries)
    for path, found in entries.items():
        assert (records[path].crc32, records[path].size, records[path].device) == (
            found.crc,
            found.header.size,
            2,
        )


def test_a_missing_wal_segment_fails(tmp_path: Path) -> None:
    wal = pack.Entry(
        EntryKind.FILE,
        "pg_wal/000000010000000000000009",
        16,
        0o600,
        0,
        str(tmp_path / "000000010000000000000009"),
        required=True,
    )
    packer = pack.Packer(0)
    packer.buffer, packer.filled = memoryview(bytearray(4096)), 0
    with pytest.raises(PostgresError, match=r"/000000010000000000000009 is missing"):
        packer.fill([pack.WorkList([wal])])


def test_a_backup_while_pgbench_writes(pg: PgServer, tmp_path: Path) -> None:
    argv = [
        pg.tool("pgbench"),
        "-T",
        "4",
        "-c",
        "2",
        "-n",
        *pg.connection("postgres")[:6],
        "postgres",
    ]
    with subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as bench:
        time.sleep(0.5)  # let it start writing: the backup reads a changing cluster
        taken = take(pg, tmp_path)
        _, errors = bench.communicate(timeout=60)
    assert bench.returncode == 0, errors
    info = taken.engine_result.postgresql
    assert len(info["wal"]) >= 1
    assert ours(pg) == ("0", "0")


def test_few_buffers_do_not_stall_the_devices(pg: PgServer, tmp_path: Path) -> None:
    # each device holds a partly filled buffer while it waits for pg_backup_stop
    options = dataclasses.replace(OPTIONS, buffer_count=1, command_timeout=60.0)
    taken = take(pg, tmp_path, options)
    assert taken.engine_result.postgresql["file_count"] > 900
