"""``PgFilesBackup``: PostgreSQL's data directory read by vdistream itself, in parallel
across the devices, in the format of ``vdistream.engines.pgfiles.layout``.

In order:

1. before the set is opened: connect (``pgsession.BackupConnection``, one session kept
   for the whole backup), learn the server's facts and check that this process can
   read the data directory and the tablespaces (``check_readable``: same host, same
   cluster, permissions); every refusal is one ``PostgresError`` line saying what to do;
2. configure the set (WRITE_MEDIA, plus READ_MEDIA when disk-like; BUFFERCOUNT 4 a
   device unless given, and at least one more than the devices), open the devices,
   one header block each (``FLAG_FILES``);
3. a temporary replication slot and ``pg_backup_start(label, fast)``, then ``walk``
   lists what to copy;
4. the devices copy the listing: device 0 first writes the directories and links, then
   every device takes the next largest file from one shared list whenever it is free,
   so that they finish together; each file lies whole on one device. A device fills
   each set buffer (MAXTRANSFERSIZE) with entries back to back: many small files share
   a buffer, a large one spans buffers. ALL of a buffer's per-byte work (opens,
   ``preadv`` straight into the buffer, the per-file CRC-32 and the payload CRC-32)
   is one worker-thread call (``Packer.fill``), so the event loop only sends WRITEs;
   the set's pool lets each device have WRITEs in flight while it fills the next one;
5. when every device copied its data files: ``pg_backup_stop``; ``backup_label`` and
   (if not empty) ``tablespace_map`` as FILE entries and the WAL from the start
   position's segment to the stop position's as ``pg_wal/<segment>`` (read from the
   server's ``pg_wal``, kept there by the slot) with every timeline history file
   (``pg_wal/<tli>.history``, as ``pg_basebackup`` copies them), over the devices the
   same way; the slot is dropped;
6. device 0 ends with the INDEX entry (``BackupIndex``: every entry's device, size and
   CRC-32, the positions, the WAL); every device pads its payload to the block size
   and writes its trailer; FLUSH, then COMPLETE when granted, then the devices and the
   set are closed, as the striping engine does.

Files that vanish before they are opened are skipped (not listed); a file that shrank
is padded with zeros to its listed size (``FLAG_PADDED`` when the open saw it
shorter), a file that grew is read to its listed size only: WAL replay from the
backup's start rewrites every page changed meanwhile, which is what makes a copy of a
live data directory consistent. Any failure aborts the set and ends the session, which
aborts the server's backup and drops the slot (the server does both when the
connection closes, so a killed vdistream leaves nothing behind either).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import os
import re
import stat
import struct
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio

from vdistream.engines.base import Direction, Engine, EngineResult
from vdistream.engines.faults import FailPoint, Phase, session_for
from vdistream.engines.framing import (
    FLAG_DISK_LIKE,
    StreamHeader,
    StreamTrailer,
)
from vdistream.engines.pgfiles.layout import (
    FLAG_FILES,
    INDEX_PATH,
    BackupIndex,
    EntryKind,
)
from vdistream.engines.pgfiles.pack import Entry, Packer, WorkList
from vdistream.engines.pgfiles.pgsession import (
    BackupConnection,
    BackupStart,
    BackupStop,
    ServerFacts,
    wal_segment_names,
)
from vdistream.engines.pgfiles.walk import Item, ItemKind, walk
from vdistream.engines.postgres import PostgresError, PostgresURL
from vdistream.engines.session import PendingWrite, ServerSession, device_queues
from vdistream.engines.striping import StripingOptions
from vdistream.log import get_logger
from vdistream.protocol import CommandCode, Features, VDConfig
from vdistream.threads import run_sync
from vdistream.vdi import Registry

__all__ = ("PgFilesBackup", "PgFilesResult", "check_readable")

#: Buffers a device when BUFFERCOUNT is not given: one being filled, three WRITEs in flight.
BUFFERS_PER_DEVICE = 4
_CONTROL_ID = struct.Struct("<Q")  # ControlFileData starts with the system identifier
_HISTORY = re.compile(r"[0-9A-F]{8}\.history")

_log = get_logger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class PgFilesResult(EngineResult):
    """``EngineResult`` with what PostgreSQL said of the backup: ``start_lsn``,
    ``stop_lsn``, ``timeline``, ``system_identifier``, ``server_version``, ``wal``
    (segment names), ``tablespaces`` ({oid: location}), ``files`` (every entry as
    ``FileRecord.to_json()``), ``file_count`` and ``data_bytes`` (= ``logical_bytes``,
    the data bytes of every entry but the index)."""

    postgresql: dict[str, Any] = dataclasses.field(default_factory=dict)


# --- preconditions -------------------------------------------------------------------


def check_readable(facts: ServerFacts) -> None:
    """``PostgresError`` unless this process can read the cluster's files here (module
    docstring): the data directory exists on this host, is this server's (its
    ``global/pg_control`` names the server's system identifier), and it and every
    tablespace location can be listed and read."""
    data = facts.data_directory
    advice = (
        "run vdistream as the server's user (postgres), or give the cluster group read "
        "access (initdb -g, or data_directory_mode 0750) and run it in that group"
    )
    if not os.path.isdir(data):
        try:
            os.stat(data)
        except PermissionError:
            raise PostgresError(f"cannot read {data} (Permission denied): {advice}") from None
        except OSError:
            raise PostgresError(
                f"the data directory {data} does not exist on this host: vdistream must run "
                "on the database server's host for --mode files"
            ) from None
    control = os.path.join(data, "global", "pg_control")
    try:
        with os.scandir(data) as scan:
            next(scan, None)
        with open(control, "rb") as file:
            head = file.read(_CONTROL_ID.size)
    except PermissionError as exc:
        raise PostgresError(
            f"cannot read {exc.filename or data} ({os.strerror(exc.errno or errno.EACCES)}): "
            f"{advice}"
        ) from None
    except OSError as exc:
        raise PostgresError(f"cannot read {exc.filename or data}: {exc.strerror}") from None
    if len(head) == _CONTROL_ID.size and str(_CONTROL_ID.unpack(head)[0]) != (
        facts.system_identifier
    ):
        raise PostgresError(
            f"the data directory {data} on this host belongs to another cluster (not system "
            f"{facts.system_identifier}): vdistream must run on the database server's host "
            "for --mode files"
        )
    for oid, location in facts.tablespaces.items():
        try:
            with os.scandir(location) as scan:
                next(scan, None)
            version = os.path.join(location, facts.version_dir)
            if os.path.isdir(version):
                with os.scandir(version) as scan:
                    next(scan, None)
        except PermissionError as exc:
            raise PostgresError(
                f"cannot read tablespace {oid} at {exc.filename or location}: {advice}"
            ) from None
        except OSError as exc:
            raise PostgresError(
                f"cannot read tablespace {oid} at {exc.filename or location}: {exc.strerror}"
            ) from None


def _listing(facts: ServerFacts) -> list[Item]:
    """``walk`` of the cluster, its ``OSError`` as one ``PostgresError`` line."""
    try:
        return walk(facts.data_directory, facts.tablespaces, version_dir=facts.version_dir)
    except PermissionError as exc:
        raise PostgresError(
            f"cannot read {exc.filename or facts.data_directory} (Permission denied): run "
            "vdistream as the server's user (postgres), or give the cluster group read access "
            "(initdb -g, or data_directory_mode 0750) and run it in that group"
        ) from None
    except OSError as exc:
        raise PostgresError(
            f"cannot list {exc.filename or facts.data_directory}: {exc.strerror}"
        ) from None


def _tablespaces(packers: Sequence[Packer]) -> dict[str, str]:
    """{oid: location} of the tablespaces copied: their ``pg_tblspc/<oid>`` links (the
    walk's, so that the index, the manifest and the files agree even for a tablespace
    created after the server listed them)."""
    return {
        record.path.split("/")[1]: record.target
        for packer in packers
        for record in packer.records
        if record.kind is EntryKind.SYMLINK
        and record.path.count("/") == 1
        and record.path.startswith("pg_tblspc/")
        and record.target is not None
        and os.path.isabs(record.target)
    }


# --- the engine ----------------------------------------------------------------------


_WriteFn = Callable[[int, memoryview, int], Awaitable[None]]


@dataclasses.dataclass
class _Plan:
    """The shared state of one backup's devices."""

    tree: WorkList  # directories and links: device 0, first
    files: WorkList  # data files, largest first
    wal: WorkList  # backup_label, tablespace_map, WAL segments
    index: WorkList  # device 0's last entry
    data_done: anyio.Event
    wal_ready: anyio.Event
    wal_done: anyio.Event
    index_ready: anyio.Event
    data_left: int
    wal_left: int


class PgFilesBackup(Engine):
    """The files-mode backup of the cluster at ``url`` (module docstring).

    ``timeout`` bounds each quick SQL call, ``start_timeout`` the backup start's
    checkpoint and ``pg_backup_stop``.
    """

    def __init__(
        self,
        url: str | PostgresURL = "postgresql://",
        options: StripingOptions | None = None,
        *,
        backup_id: uuid.UUID | None = None,
        fail_at: FailPoint | None = None,
        timeout: float = 60.0,
        start_timeout: float = 600.0,
    ) -> None:
        self.url = url if isinstance(url, PostgresURL) else PostgresURL.parse(url)
        self.options = options if options is not None else StripingOptions()
        self.backup_id = backup_id if backup_id is not None else uuid.uuid4()
        self.fail_at = fail_at
        self.timeout = timeout
        self.start_timeout = start_timeout
        self._ran = False
        self._connection: BackupConnection | None = None
        self._facts: ServerFacts | None = None

    @property
    def direction(self) -> Direction:
        return Direction.BACKUP

    async def run(self, set_name: str, *, registry: Registry | None = None) -> PgFilesResult:
        if self._ran:
            raise RuntimeError("PgFilesBackup serves one job; build a new one")
        self._ran = True
        log = _log.bind(set_name=set_name, postgres=self.url.display)
        connection = None
        try:
            connection = await BackupConnection.open(
                self.url, timeout=self.timeout, start_timeout=self.start_timeout
            )
            self._connection = connection
            self._facts = await connection.facts()
            await run_sync(check_readable, self._facts)
            session = session_for(
                set_name,
                self.fail_at,
                registry=registry,
                open_timeout=self.options.open_timeout,
                command_timeout=self.options.command_timeout,
            )
            result = await session.run(self._backup)
        except PostgresError as exc:
            exc.locate(set_name)
            raise
        finally:
            if connection is not None:
                await connection.close()
        log.info(
            "pgfiles_backup_done",
            files=result.postgresql["file_count"],
            bytes=result.logical_bytes,
        )
        return result

    async def _backup(self, s: ServerSession) -> PgFilesResult:
        opts = self.options
        connection, facts = self._connection, self._facts
        assert connection is not None
        assert facts is not None
        await s.fault(Phase.BEFORE_CONFIGURATION)
        disk = bool(s.client_config.features & Features.RANDOM_ACCESS)
        n = s.device_count
        # Each device may hold a partly filled buffer while it waits for the others (the
        # backup's stop, the index): one more than that keeps the rest moving.
        given = opts.buffer_count if opts.buffer_count is not None else BUFFERS_PER_DEVICE * n
        buffers = max(given, n + 1)
        final = await s.configure(
            features=Features.WRITE_MEDIA | (Features.READ_MEDIA if disk else 0),
            block_size=opts.block_size,
            max_transfer_size=opts.max_transfer_size,
            buffer_count=buffers,
            honour_complete=opts.honour_complete,
        )
        await s.fault(Phase.AFTER_CONFIGURATION)
        await s.open_devices()
        if disk:
            await s.position_devices()
        packers = [Packer(index) for index in range(n)]
        try:
            start, stop, wal = await self._streams(s, connection, facts, packers, disk)
        finally:
            for packer in packers:
                packer.close()
        await s.end_streams(complete=bool(final.features & Features.COMPLETE_ENABLED))
        await s.fault(Phase.BEFORE_CLOSE)
        await s.close_devices()
        return self._result(s, final, facts, start, stop, wal, packers)

    async def _streams(
        self,
        s: ServerSession,
        connection: BackupConnection,
        facts: ServerFacts,
        packers: list[Packer],
        disk: bool,
    ) -> tuple[BackupStart, BackupStop, list[str]]:
        """Headers, the backup itself, trailers (module docstring, steps 2-6)."""
        n = s.device_count
        block, chunk = self.options.block_size, self.options.max_transfer_size
        positions = [0] * n
        with contextlib.ExitStack() as streams:
            queues = device_queues(streams, n, PendingWrite)

            async def write(index: int, buffer: memoryview, size: int) -> None:
                pending = await s.send(
                    index, CommandCode.WRITE, size, positions[index] if disk else 0, buffer[:size]
                )
                positions[index] += size
                queues[index][0].send_nowait(PendingWrite(pending, buffer))

            async with s.task_group() as tasks:
                for index, (_, receive) in enumerate(queues):
                    tasks.start_soon(s.await_writes, index, receive, name=f"writes {index}")
                flags = FLAG_FILES | (FLAG_DISK_LIKE if disk else 0)
                for index in range(n):
                    buffer = await s.allocate(block)
                    StreamHeader(self.backup_id, index, n, block, chunk, flags).pack_into(buffer)
                    await write(index, buffer, block)

                start = await connection.start(f"vdistream {self.backup_id}")
                items = await run_sync(functools.partial(_listing, facts))
                tree = [Entry.of(item) for item in items if item.kind is not ItemKind.FILE]
                files = [Entry.of(item) for item in items if item.kind is ItemKind.FILE]
                s.log.info(
                    "pgfiles_listed",
                    files=len(files),
                    bytes=sum(entry.size for entry in files),
                    directories_and_links=len(tree),
                    start_lsn=start.lsn,
                )
                plan = _Plan(
                    WorkList(tree),
                    WorkList(files),
                    WorkList(),
                    WorkList(),
                    anyio.Event(),
                    anyio.Event(),
                    anyio.Event(),
                    anyio.Event(),
                    data_left=n,
                    wal_left=n,
                )
                async with s.task_group() as devices:
                    for index in range(n):
                        devices.start_soon(
                            self._device, s, packers[index], plan, write, name=f"device {index}"
                        )
                    await plan.data_done.wait()
                    stop = await connection.stop()
                    wal = wal_segment_names(
                        start.lsn, stop.lsn, start.timeline, facts.wal_segment_size
                    )
                    plan.wal.extend(await run_sync(self._wal_entries, facts, start, stop, wal))
                    plan.wal_ready.set()
                    await plan.wal_done.wait()
                    await connection.drop_slot()
                    index_entry = self._index(facts, start, stop, wal, packers)
                    plan.index.extend([index_entry])
                    plan.index_ready.set()
                await s.fault(Phase.MID_STREAM)  # the data ended before it fired
                for index in range(n):
                    buffer = await s.allocate(block)
                    packer = packers[index]
                    StreamTrailer(
                        self.backup_id,
                        index,
                        n,
                        packer.total,
                        packer.payload,
                        packer.entries,
                        packer.crc,
                    ).pack_into(buffer)
                    await write(index, buffer, block)
                for send, _ in queues:
                    send.close()
        return start, stop, wal

    async def _device(
        self,
        s: ServerSession,
        packer: Packer,
        plan: _Plan,
        write: _WriteFn,
    ) -> None:
        """One device's share: data files, WAL, (device 0) the index, the last buffer."""
        index = packer.device
        sources = [plan.tree, plan.files] if index == 0 else [plan.files]
        await self._pump(s, packer, sources, write)
        plan.data_left -= 1
        if not plan.data_left:
            plan.data_done.set()
        await plan.wal_ready.wait()
        await self._pump(s, packer, [plan.wal], write)
        plan.wal_left -= 1
        if not plan.wal_left:
            plan.wal_done.set()
        if index == 0:
            await plan.index_ready.wait()
            await self._pump(s, packer, [plan.index], write)
        if packer.filled:
            size = packer.finish(self.options.block_size)
            buffer, packer.buffer = packer.buffer, None
            assert buffer is not None
            await write(index, buffer, size)
        elif packer.buffer is not None:
            s.free(packer.buffer)
            packer.buffer = None

    async def _pump(
        self, s: ServerSession, packer: Packer, sources: Sequence[WorkList], write: _WriteFn
    ) -> None:
        """Fill and WRITE full buffers until ``sources`` run dry (a partly filled buffer
        stays with the packer)."""
        chunk = self.options.max_transfer_size
        while True:
            if packer.buffer is None:
                packer.buffer = await s.allocate(chunk)
                packer.filled = 0
            # No limiter of our own: each device has at most one fill running (this
            # loop awaits it), so the devices bound the job's calls already.
            full = await run_sync(packer.fill, sources)
            if not full:
                return
            buffer, packer.buffer = packer.buffer, None
            await write(packer.device, buffer, chunk)

    @staticmethod
    def _wal_entries(
        facts: ServerFacts, start: BackupStart, stop: BackupStop, wal: list[str]
    ) -> list[Entry]:
        """``backup_label``, ``tablespace_map``, the WAL segments and every timeline
        history file of ``pg_wal`` as entries."""
        entries = [Entry.memory("backup_label", stop.backup_label)]
        if stop.tablespace_map:
            entries.append(Entry.memory("tablespace_map", stop.tablespace_map))
        pg_wal = os.path.join(facts.data_directory, "pg_wal")
        names = list(wal)
        # Every timeline history file, as basebackup.c sends them: recovery needs the
        # backup's timeline's (and a standby's may change while it runs); the older
        # ones are small and what an operator reads to follow a timeline switch.
        try:
            with os.scandir(pg_wal) as scan:
                history = sorted(entry.name for entry in scan if _HISTORY.fullmatch(entry.name))
        except OSError as exc:
            raise PostgresError(f"cannot list {pg_wal}: {exc.strerror}") from None
        for name in names + history:
            source = os.path.join(pg_wal, name)
            try:
                st = os.stat(source)
            except OSError as exc:
                if name in history and isinstance(exc, FileNotFoundError):
                    continue  # removed since it was listed: not one the backup needs
                raise PostgresError(
                    f"the WAL file {source} the backup needs cannot be read: {exc.strerror}"
                ) from None
            size = facts.wal_segment_size if not name.endswith(".history") else st.st_size
            entries.append(
                Entry(
                    EntryKind.FILE,
                    f"pg_wal/{name}",
                    size,
                    stat.S_IMODE(st.st_mode),
                    st.st_mtime_ns,
                    source=source,
                    required=True,
                )
            )
        return entries

    def _index(
        self,
        facts: ServerFacts,
        start: BackupStart,
        stop: BackupStop,
        wal: list[str],
        packers: list[Packer],
    ) -> Entry:
        index = BackupIndex(
            backup_id=str(self.backup_id),
            records=tuple(record for packer in packers for record in packer.records),
            start_lsn=start.lsn,
            stop_lsn=stop.lsn,
            timeline=start.timeline,
            wal=tuple(wal),
            system_identifier=facts.system_identifier,
            server_version=facts.server_version,
            extra={
                "tablespaces": _tablespaces(packers),
                "wal_segment_size": facts.wal_segment_size,
                "data_directory": facts.data_directory,
            },
        )
        return Entry.memory(INDEX_PATH, index.to_bytes(), EntryKind.INDEX)

    def _result(
        self,
        s: ServerSession,
        final: VDConfig,
        facts: ServerFacts,
        start: BackupStart,
        stop: BackupStop,
        wal: list[str],
        packers: list[Packer],
    ) -> PgFilesResult:
        records = [record for packer in packers for record in packer.records]
        listed = [record for record in records if record.kind is not EntryKind.INDEX]
        data_bytes = sum(record.size for record in listed)
        return PgFilesResult(
            direction=self.direction,
            set_name=s.set_name,
            devices=s.stats(),
            logical_bytes=data_bytes,
            features=final.features,
            backup_id=str(self.backup_id),
            postgresql={
                "start_lsn": start.lsn,
                "stop_lsn": stop.lsn,
                "timeline": start.timeline,
                "system_identifier": facts.system_identifier,
                "server_version": facts.server_version,
                "wal": list(wal),
                "tablespaces": _tablespaces(packers),
                "files": [record.to_json() for record in listed],
                "file_count": len(listed),
                "data_bytes": data_bytes,
            },
        )
