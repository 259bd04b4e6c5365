"""The files-mode restore (``PgFilesRestore``) against streams a test-side encoder builds
from a real directory (``layout`` + ``framing``), served by the real coordinator from
real files: byte-exact parallel restore, corruption and missing files refused with the
target left as found, unsafe paths refused, delta restores writing only what changed,
a running server refused, ``pg_control`` written last, tablespaces."""

from __future__ import annotations

import dataclasses
import os
import stat
import uuid
import zlib
from pathlib import Path

import anyio
import pytest

import vdistream
from tests.engines.fake_client import FakeClient, run_job
from vdistream import Completion, Registry
from vdistream.coordinator import stream_key
from vdistream.engines import EngineError, StreamFormatError, StripingOptions
from vdistream.engines.faults import Action, FailPoint, Phase
from vdistream.engines.framing import StreamHeader, StreamTrailer, round_up
from vdistream.engines.pgfiles.layout import (
    FLAG_FILES,
    FOOTER,
    INDEX_PATH,
    BackupIndex,
    EntryHeader,
    EntryKind,
    FileRecord,
)
from vdistream.engines.pgfiles.restore import PgFilesRestore, PgFilesRestoreResult
from vdistream.engines.scoped import EndpointError, TargetExistsError

pytestmark = pytest.mark.asyncio

BLOCK = 4096
CHUNK = 65536
OPTIONS = StripingOptions(block_size=BLOCK, max_transfer_size=CHUNK)
DEVICES = 4


# --- the test-side encoder --------------------------------------------------------------


@dataclasses.dataclass
class Item:
    kind: EntryKind
    path: str
    data: bytes
    mode: int
    mtime_ns: int
    target: str | None = None


def scan(root: Path, tablespaces: dict[str, Path] | None = None) -> list[Item]:
    """Every directory, symlink and file below ``root`` (not ``root`` itself); the
    content of ``tablespaces`` ({oid: location}) as ``pg_tblspc/<oid>/...``."""
    items: list[Item] = []

    def visit(top: Path, prefix: str) -> None:
        for path in sorted(top.rglob("*")):
            rel = prefix + str(path.relative_to(top))
            info = path.lstat()
            mode, mtime = stat.S_IMODE(info.st_mode), info.st_mtime_ns
            if path.is_symlink():
                target = os.readlink(path)
                items.append(Item(EntryKind.SYMLINK, rel, target.encode(), 0o777, mtime, target))
            elif path.is_dir():
                items.append(Item(EntryKind.DIRECTORY, rel, b"", mode, mtime))
            else:
                items.append(Item(EntryKind.FILE, rel, path.read_bytes(), mode, mtime))

    visit(root, "")
    for oid, location in (tablespaces or {}).items():
        visit(location, f"pg_tblspc/{oid}/")
    return items


def encode(
    items: list[Item],
    devices: int = DEVICES,
    *,
    corrupt: str | None = None,
    drop: str | None = None,
    extra: Item | None = None,
    backup_id: uuid.UUID | None = None,
    flags: int = FLAG_FILES,
) -> tuple[list[bytes], list[FileRecord]]:
    """The device streams of a backup of ``items`` and the records of its index.

    Directories and symlinks go on device 0 first, files largest first each to the
    device with the fewest bytes, the index last on device 0. ``corrupt`` flips a byte
    of that file's data after its CRC was taken (the stream itself stays well framed),
    ``drop`` leaves that entry out of its stream but not out of the index, ``extra``
    adds an entry the index does not list.
    """
    backup_id = backup_id or uuid.uuid4()
    placed: list[list[Item]] = [[] for _ in range(devices)]
    load = [0] * devices
    for item in items:
        if item.kind is not EntryKind.FILE:
            placed[0].append(item)
    for item in sorted((i for i in items if i.kind is EntryKind.FILE), key=lambda i: -len(i.data)):
        device = load.index(min(load))
        placed[device].append(item)
        load[device] += len(item.data) + 64
    records = [
        FileRecord(
            item.path,
            item.kind,
            len(item.data),
            zlib.crc32(item.data),
            device,
            item.mode,
            item.mtime_ns,
            item.target,
        )
        for device, entries in enumerate(placed)
        for item in entries
    ]
    if extra is not None:
        placed[devices - 1].append(extra)
    index = BackupIndex(
        backup_id=str(backup_id),
        records=tuple(records),
        start_lsn="0/2000028",
        stop_lsn="0/2000100",
        timeline=1,
        wal=(),
        system_identifier="1",
        server_version=150000,
    )
    streams = []
    for device, entries in enumerate(placed):
        payload = bytearray()
        count = 0
        for item in entries:
            if item.path == drop:
                continue
            header = EntryHeader(
                item.kind, item.path.encode(), len(item.data), item.mode, item.mtime_ns
            )
            payload += _entry(header, item.data, corrupt=item.path == corrupt)
            count += 1
        if device == 0:
            data = index.to_bytes()
            payload += _entry(EntryHeader(EntryKind.INDEX, INDEX_PATH.encode(), len(data)), data)
            count += 1
        total = len(payload)
        payload += bytes(round_up(total, BLOCK) - total)
        head = bytearray(BLOCK)
        StreamHeader(backup_id, device, devices, BLOCK, CHUNK, flags).pack_into(memoryview(head))
        tail = bytearray(BLOCK)
        StreamTrailer(
            backup_id, device, devices, total, len(payload), count, zlib.crc32(payload)
        ).pack_into(memoryview(tail))
        streams.append(bytes(head + payload + tail))
    return streams, records


def _entry(header: EntryHeader, data: bytes, *, corrupt: bool = False) -> bytes:
    head = bytearray(header.packed_size)
    header.pack_into(memoryview(head))
    body = bytearray(data)
    if corrupt:
        body[len(body) // 2] ^= 0x40
    return bytes(head) + bytes(body) + FOOTER.pack(zlib.crc32(data))


# --- running a restore -------------------------------------------------------------------


def store(streams: list[bytes], where: Path, backup_id: str = "b") -> Path:
    for index, stream in enumerate(streams):
        path = where / stream_key(backup_id, index, len(streams))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(stream)
    return where


async def restore(
    streams: list[bytes], storage: Path, engine: PgFilesRestore
) -> PgFilesRestoreResult:
    store(streams, storage)
    result = await vdistream.restore(
        engine, str(storage), "b", options=vdistream.JobOptions(devices=len(streams))
    )
    if not result.ok:
        assert result.error is not None
        raise result.error
    assert isinstance(result.engine_result, PgFilesRestoreResult)
    return result.engine_result


def tree(root: Path) -> dict[str, tuple[str, int, int, bytes]]:
    """path -> (kind, mode, mtime_ns of files, content or link target)."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        info = path.lstat()
        if path.is_symlink():
            found[rel] = ("link", 0, 0, os.readlink(path).encode())
        elif path.is_dir():
            found[rel] = ("dir", stat.S_IMODE(info.st_mode), info.st_mtime_ns, b"")
        else:
            found[rel] = ("file", stat.S_IMODE(info.st_mode), info.st_mtime_ns, path.read_bytes())
    return found


def make_cluster(root: Path) -> Path:
    """A small data-directory-like tree: files around the chunk size, empty ones, a
    symlink, odd modes and mtimes, and ``global/pg_control``."""
    rng = __import__("random").Random(7)
    (root / "base" / "1").mkdir(parents=True)
    (root / "global").mkdir()
    (root / "pg_wal" / "archive_status").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "PG_VERSION").write_bytes(b"15\n")
    (root / "global" / "pg_control").write_bytes(rng.randbytes(8192))
    sizes = [0, 1, 100, BLOCK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17, 300_000, 8192, 8192, 24576]
    for number, size in enumerate(sizes):
        (root / "base" / "1" / str(1000 + number)).write_bytes(rng.randbytes(size))
    for number in range(40):  # many small files: several share a READ buffer
        (root / "global" / str(2000 + number)).write_bytes(rng.randbytes(rng.randrange(1, 3000)))
    (root / "pg_wal" / "000000010000000000000001").write_bytes(rng.randbytes(2 * CHUNK))
    (root / "base" / "1" / "1001").chmod(0o640)
    os.utime(root / "base" / "1" / "1002", ns=(1_600_000_000_123_456_789,) * 2)
    (root / "link").symlink_to("base/1")
    (root / "empty").chmod(0o750)
    os.utime(root / "empty", ns=(1_500_000_000_000_000_000,) * 2)
    return root


@pytest.fixture
def cluster(tmp_path: Path) -> Path:
    return make_cluster(tmp_path / "source")


# --- fresh restores ---------------------------------------------------------------------


async def test_a_parallel_restore_is_byte_exact(tmp_path: Path, cluster: Path) -> None:
    streams, records = encode(scan(cluster))
    target = tmp_path / "restored"
    result = await restore(streams, tmp_path / "store", PgFilesRestore(target, OPTIONS))
    assert tree(target) == tree(cluster)
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    files = [r for r in records if r.kind is not EntryKind.DIRECTORY]
    assert result.written_files == len(files)
    assert (result.skipped_files, result.removed_paths) == (0, 0)
    assert result.logical_bytes == sum(r.size for r in records if r.kind is EntryKind.FILE)
    assert all(device.bytes == len(s) for device, s in zip(result.devices, streams, strict=True))
    assert not target.with_name(".restored.vdistream-restore.lock").exists()


async def test_the_same_streams_restore_through_the_fake_client_with_odd_reads(
    tmp_path: Path, cluster: Path
) -> None:
    streams, _ = encode(scan(cluster), devices=3)
    registry = Registry()
    client = FakeClient(registry, 3, streams=streams, batch=3, eof_code=Completion.NO_DATA_DETECTED)
    odd = StripingOptions(
        block_size=BLOCK, max_transfer_size=CHUNK, read_sizes=(BLOCK, 3 * BLOCK, CHUNK)
    )
    target = tmp_path / "restored"
    await run_job(PgFilesRestore(target, odd), client, registry)
    assert tree(target) == tree(cluster)


async def test_pg_control_is_written_last(tmp_path: Path, cluster: Path) -> None:
    streams, _ = encode(scan(cluster))
    target = tmp_path / "restored"
    await restore(streams, tmp_path / "store", PgFilesRestore(target, OPTIONS))
    control = (target / "global" / "pg_control").stat().st_ctime_ns
    others = [
        p.lstat().st_ctime_ns for p in target.rglob("*") if p.is_file() and p.name != "pg_control"
    ]
    assert control >= max(others)


async def test_a_failure_before_the_end_never_leaves_pg_control(
    tmp_path: Path, cluster: Path
) -> None:
    # A delta restore keeps what it wrote when it fails: everything but pg_control.
    streams, records = encode(scan(cluster))
    target = tmp_path / "restored"
    await restore(streams, tmp_path / "store", PgFilesRestore(target, OPTIONS))
    (target / "base" / "1" / "1005").write_bytes(b"changed")
    fail = FailPoint(Phase.BEFORE_CLOSE, Action.RAISE)
    engine = PgFilesRestore(target, OPTIONS, delta=True, expected=records, fail_at=fail)
    with pytest.raises(vdistream.engines.EngineError):
        await restore(streams, tmp_path / "store2", engine)
    assert not (target / "global" / "pg_control").exists()
    assert (target / "base" / "1" / "1005").read_bytes() == (cluster / "base/1/1005").read_bytes()


@pytest.mark.parametrize("action", [Action.RAISE, Action.SIGNAL_ABORT])
async def test_a_restore_failing_mid_stream_leaves_the_target_as_found(
    tmp_path: Path, cluster: Path, action: Action
) -> None:
    streams, _ = encode(scan(cluster))
    target = tmp_path / "restored"
    target.mkdir()
    fail = FailPoint(Phase.MID_STREAM, action, after_bytes=3 * CHUNK)
    with pytest.raises(vdistream.engines.EngineError):
        await restore(streams, tmp_path / "store", PgFilesRestore(target, OPTIONS, fail_at=fail))
    assert list(target.iterdir()) == []
    assert not target.with_name(".restored.vdistream-restore.lock").exists()


async def test_a_corrupt_file_fails_naming_it_and_leaves_the_target_as_found(
    tmp_path: Path, cluster: Path
) -> None:
    streams, _ = encode(scan(cluster), corrupt="base/1/1007")
    target = tmp_path / "restored"
    with pytest.raises(StreamFormatError, match=r"the file base/1/1007 does not match its CRC-32"):
        await restore(streams, tmp_path / "store", PgFilesRestore(target, OPTIONS))
    assert not target.exists()
    empty = tmp_path / "empty-target"
    empty.mkdir()
    with pytest.raises(StreamFormatError, match=r"base/1/1007.*device"):
        await restore(streams, tmp_path / "store2", PgFilesRestore(empty, OPTIONS))
    assert list(empty.iterdir()) == []


async def test_a_stream_of_another_engine_is_refused(tmp_path: Path, cluster: Path) -> None:
    streams, _ = encode(scan(cluster), flags=0)
    with pytest.raises(StreamFormatError, match="not a PostgreSQL files-mode backup"):
        await restore(streams, tmp_path / "store", PgFilesRestore(tmp_path / "r", OPTIONS))
    assert not (tmp_path / "r").exists()


async def test_a_truncated_stream_is_refused(tmp_path: Path, cluster: Path) -> None:
    streams, _ = encode(scan(cluster))
    streams[1] = streams[1][: -3 * BLOCK]
    with pytest.raises(StreamFormatError):
        await restore(streams, tmp_path / "store", PgFilesRestore(tmp_path / "r", OPTIONS))
    assert not (tmp_path / "r").exists()


async def test_a_missing_file_fails_the_index_check(tmp_path: Path, cluster: Path) -> None:
    streams, _ = encode(scan(cluster), drop="global/2003")
    target = tmp_path / "restored"
    with pytest.raises(
        StreamFormatError, match=r"do not match the backup's index: global/2003 is missing"
    ):
        await restore(streams, tmp_path / "store", PgFilesRestore(target, OPTIONS))
    assert not target.exists()


async def test_an_unlisted_file_fails_the_index_check(tmp_path: Path, cluster: Path) -> None:
    extra = Item(EntryKind.FILE, "base/1/9999", b"stowaway", 0o600, 0)
    streams, _ = encode(scan(cluster), extra=extra)
    with pytest.raises(
        StreamFormatError, match=r"base/1/9999 arrived on .* but is not in the index"
    ):
        await restore(streams, tmp_path / "store", PgFilesRestore(tmp_path / "r", OPTIONS))
    assert not (tmp_path / "r").exists()


async def test_a_manifest_that_disagrees_with_the_index_fails(
    tmp_path: Path, cluster: Path
) -> None:
    streams, records = encode(scan(cluster))
    changed = [
        dataclasses.replace(r, crc32=r.crc32 ^ 1) if r.path == "PG_VERSION" else r for r in records
    ]
    with pytest.raises(StreamFormatError, match=r"PG_VERSION differs between the manifest"):
        await restore(
            streams, tmp_path / "store", PgFilesRestore(tmp_path / "r", OPTIONS, expected=changed)
        )
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "path", ["../escaped", "/tmp/absolute", "base/../../escaped", "a//b", "./x"]
)
async def test_unsafe_paths_are_refused(tmp_path: Path, cluster: Path, path: str) -> None:
    items = [*scan(cluster), Item(EntryKind.FILE, path, b"evil", 0o600, 0)]
    streams, _ = encode(items)
    target = tmp_path / "deep" / "restored"
    with pytest.raises(StreamFormatError, match=r"is refused: "):
        await restore(streams, tmp_path / "store", PgFilesRestore(target, OPTIONS))
    assert not target.exists()
    assert not (tmp_path / "deep" / "escaped").exists()
    assert not (tmp_path / "escaped").exists()


async def test_a_symlink_out_of_the_directory_is_refused(tmp_path: Path, cluster: Path) -> None:
    items = [*scan(cluster), Item(EntryKind.SYMLINK, "out", b"/etc", 0o777, 0, "/etc")]
    streams, _ = encode(items)
    with pytest.raises(StreamFormatError, match=r"the symlink 'out' points to '/etc'"):
        await restore(streams, tmp_path / "store", PgFilesRestore(tmp_path / "r", OPTIONS))
    assert not (tmp_path / "r").exists()


async def test_a_target_that_is_not_empty_is_refused_before_the_set_opens(
    tmp_path: Path, cluster: Path
) -> None:
    streams, _ = encode(scan(cluster))
    target = tmp_path / "restored"
    target.mkdir()
    (target / "keep").write_text("mine")
    with pytest.raises(TargetExistsError, match="is not empty"):
        await restore(streams, tmp_path / "store", PgFilesRestore(target, OPTIONS))
    assert (target / "keep").read_text() == "mine"


async def test_a_killed_restores_debris_is_removed(tmp_path: Path, cluster: Path) -> None:
    streams, _ = encode(scan(cluster))
    target = tmp_path / "restored"
    target.mkdir()
    (target / "half-written").write_text("debris")
    lock = tmp_path / ".restored.vdistream-restore.lock"
    lock.write_text('{"pid": 1}\n')  # a record nobody holds: a killed restore's
    await restore(streams, tmp_path / "store", PgFilesRestore(target, OPTIONS))
    assert tree(target) == tree(cluster)


# --- tablespaces --------------------------------------------------------------------------


def with_tablespace(tmp_path: Path, cluster: Path) -> tuple[list[Item], Path]:
    location = tmp_path / "ts-source"
    (location / "PG_15_202209061" / "5").mkdir(parents=True)
    (location / "PG_15_202209061" / "5" / "16401").write_bytes(os.urandom(3 * CHUNK))
    (cluster / "pg_tblspc").mkdir()
    items = scan(cluster, {"16400": location})
    restored_location = tmp_path / "ts-restored"
    items.append(
        Item(
            EntryKind.SYMLINK,
            "pg_tblspc/16400",
            os.fsencode(restored_location),
            0o777,
            0,
            str(restored_location),
        )
    )
    return items, restored_location


async def test_a_tablespace_is_restored_at_its_location(tmp_path: Path, cluster: Path) -> None:
    items, location = with_tablespace(tmp_path, cluster)
    streams, records = encode(items)
    target = tmp_path / "restored"
    engine = PgFilesRestore(target, OPTIONS, expected=records)
    await restore(streams, tmp_path / "store", engine)
    assert os.readlink(target / "pg_tblspc" / "16400") == str(location)
    assert tree(location) == tree(tmp_path / "ts-source")


async def test_a_tablespace_without_the_manifest_is_refused(tmp_path: Path, cluster: Path) -> None:
    items, location = with_tablespace(tmp_path, cluster)
    streams, _ = encode(items)
    target = tmp_path / "restored"
    with pytest.raises(StreamFormatError, match=r"tablespace .*needs the backup's file list"):
        await restore(streams, tmp_path / "store", PgFilesRestore(target, OPTIONS))
    assert not target.exists()
    assert not location.exists()


# --- delta restores -----------------------------------------------------------------------


async def test_a_delta_restore_writes_only_what_changed(tmp_path: Path, cluster: Path) -> None:
    streams, records = encode(scan(cluster))
    target = tmp_path / "restored"
    await restore(streams, tmp_path / "store", PgFilesRestore(target, OPTIONS))
    changed = target / "base" / "1" / "1007"
    data = bytearray(changed.read_bytes())
    data[5] ^= 1
    changed.write_bytes(bytes(data))  # same size, other content
    (target / "base" / "1" / "1008").write_bytes(b"shorter")  # other size
    (target / "global" / "2005").unlink()  # missing
    (target / "postmaster.opts").write_text("extra")
    (target / "base" / "2" / "sub").mkdir(parents=True)
    (target / "base" / "2" / "sub" / "x").write_text("extra")
    (target / "empty").rmdir()
    (target / "postmaster.pid").write_text("999999999\n")  # a dead server's
    (target / "global" / "2006").unlink()
    (target / "global" / "2006").symlink_to("/etc/passwd")  # a link where a file belongs
    (target / "base" / "1" / "1009").unlink()
    (target / "base" / "1" / "1009").mkdir()  # a directory where a file belongs
    engine = PgFilesRestore(target, OPTIONS, delta=True, expected=records)
    result = await restore(streams, tmp_path / "store2", engine)
    assert tree(target) == tree(cluster)
    # the five files, pg_control (always written), and nothing else
    assert result.written_files == 6
    files = [r for r in records if r.kind is not EntryKind.DIRECTORY]
    assert result.skipped_files == len(files) - 6
    assert result.removed_paths == 3  # postmaster.opts, postmaster.pid, base/2 (with content)


async def test_a_delta_restore_refuses_a_running_server(tmp_path: Path, cluster: Path) -> None:
    streams, records = encode(scan(cluster))
    target = tmp_path / "restored"
    await restore(streams, tmp_path / "store", PgFilesRestore(target, OPTIONS))
    (target / "postmaster.pid").write_text(f"{os.getpid()}\n{target}\n")
    engine = PgFilesRestore(target, OPTIONS, delta=True, expected=records)
    with pytest.raises(EndpointError, match=r"a server is running on .*stop it before a delta"):
        await restore(streams, tmp_path / "store2", engine)
    assert (target / "global" / "pg_control").exists()  # refused before anything changed


async def test_a_delta_restore_needs_a_data_directory_and_the_manifest(
    tmp_path: Path, cluster: Path
) -> None:
    streams, records = encode(scan(cluster))
    with pytest.raises(ValueError, match="needs expected"):
        PgFilesRestore(tmp_path, OPTIONS, delta=True)
    target = tmp_path / "not-a-cluster"
    target.mkdir()
    engine = PgFilesRestore(target, OPTIONS, delta=True, expected=records)
    with pytest.raises(EndpointError, match="not a PostgreSQL data directory"):
        await restore(streams, tmp_path / "store", engine)


async def test_a_restore_onto_a_full_disk_fails_naming_it_and_leaves_nothing(
    tmp_path: Path, cluster: Path
) -> None:
    """A 256 KiB tmpfs cannot hold the ~0.9 MiB cluster: the restore fails with the
    disk's own error, naming the file it was writing, and the target is left as found
    (an empty directory), with no lock beside it."""
    streams, _ = encode(scan(cluster))
    mount = tmp_path / "small"
    mount.mkdir()
    await anyio.run_process(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)])
    try:
        target = mount / "restored"
        target.mkdir()
        with anyio.fail_after(60), pytest.raises(EngineError, match="No space left") as raised:
            await restore(streams, tmp_path / "store", PgFilesRestore(target, OPTIONS))
        assert str(target) in str(raised.value)
        assert list(target.iterdir()) == []
        assert sorted(p.name for p in mount.iterdir()) == ["restored"]
    finally:
        await anyio.run_process(["umount", str(mount)])
