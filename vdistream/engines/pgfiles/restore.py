"""``PgFilesRestore``: a PostgreSQL files-mode backup restored into a data directory,
every device read and written independently, in parallel.

The stream format is ``layout``'s. In order:

1. Before the set opens: the target's rules (``target.RestoreTarget.prepare``: a fresh
   restore into an absent or empty directory, under an owner lock; a delta restore
   into a stopped data directory whose ``global/pg_control`` goes first).
2. Configuration with READ_MEDIA, ``buffer_count`` buffers (default 4 per device, at
   least one per device: each device gets ``buffer_count // N`` of its own), the
   devices opened (SET_POSITION to 0 when disk-like).
3. One task per device: READs of ``max_transfer_size`` bytes (or the cycle of
   ``read_sizes``) in flight up to the device's credit, their completions taken in
   order; each READ's bytes go to ONE worker-thread call
   (``restore_writer.DeviceWriter.consume``) that parses the framing and the entries
   and writes every file from the set's buffer itself, computing and checking each
   file's CRC-32 as it writes (so every byte is read once and written once). The end
   of data (HANDLE_EOF / NO_DATA_DETECTED) lets the device's other READs complete,
   the stream's trailer is checked, then CLEAR_ERROR (spec §3.7).
4. Once every device ended: device 0's index must list exactly what arrived, where
   it arrived, with its size and CRC-32, and agree with ``expected`` (the catalog
   manifest's records) when given (``restore_check``).
5. The target's end (``RestoreTarget.finish``): a delta restore removes what the
   backup does not list; the tree goes to ``owner``; every directory is fsynced (the
   files were, each after its last byte, unless ``sync="syncfs"`` syncs the whole file
   system once here); ``global/pg_control`` is written LAST, so that no partial
   restore can ever start. Then the devices and the set are closed.

Any failure, abort or cancellation aborts the set and, for a fresh restore, leaves the
directory (and tablespace locations) as found; a failed delta restore leaves the
target without ``pg_control``. Errors are ``StreamFormatError`` (the stream is not
what the backup wrote) or ``EndpointError`` (the target refused), one line naming the
file and the device. The result (``PgFilesRestoreResult``) counts the files written,
those a delta restore could keep, and the paths it removed; the same figures are
logged as ``pgfiles_restored``.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import itertools
import os
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import anyio

from vdistream import threads
from vdistream.engines.base import (
    Direction,
    Engine,
    EngineResult,
    StreamFormatError,
    completion_name,
)
from vdistream.engines.faults import FailPoint, Phase, session_for
from vdistream.engines.pgfiles.layout import FileRecord
from vdistream.engines.pgfiles.restore_check import check_arrivals
from vdistream.engines.pgfiles.restore_writer import DeviceWriter
from vdistream.engines.pgfiles.target import RestoreTarget
from vdistream.engines.scoped import EndpointError
from vdistream.engines.session import ServerSession
from vdistream.engines.striping import StripingOptions
from vdistream.log import get_logger
from vdistream.protocol import CommandCode, Completion, Features
from vdistream.vdi import Registry
from vdistream.vdi.contract import PendingResult

__all__ = ("BUFFERS_PER_DEVICE", "PgFilesRestore", "PgFilesRestoreResult")

#: Default buffers per device: one being written by its thread, the rest being read.
BUFFERS_PER_DEVICE = 4
_END_OF_DATA = frozenset({Completion.HANDLE_EOF, Completion.NO_DATA_DETECTED})
_AFTER_END = _END_OF_DATA | {Completion.IO_DEVICE}
#: How many problems of the index check the error message names.
_SHOWN_PROBLEMS = 3

_log = get_logger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class PgFilesRestoreResult(EngineResult):
    """An ``EngineResult`` with what the restore did to the files: ``written_files``
    (files and symlinks written), ``skipped_files`` (a delta restore's unchanged
    ones), ``removed_paths`` (what a delta restore removed)."""

    written_files: int = 0
    skipped_files: int = 0
    removed_paths: int = 0


@dataclasses.dataclass(slots=True)
class _Read:
    pending: PendingResult
    buffer: memoryview
    size: int


def _syncfs(path: Path) -> None:
    """``syncfs(2)`` on the file system holding ``path``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if libc.syncfs(fd) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno), str(path))
    finally:
        os.close(fd)


class PgFilesRestore(Engine):
    """A files-mode backup restored into ``target`` (module docstring).

    ``delta`` restores over an existing (stopped) data directory, writing only the
    files that differ; it needs ``expected``, the manifest's records. ``owner`` (a
    user name or uid; root only) is given the restored tree (a delta restore run as
    root without it gives it to the data directory's owner). ``sync`` is ``"fsync"``
    (each file after its last byte) or ``"syncfs"`` (the file system once, at the
    end). ``tablespaces_under`` restores each tablespace into ``<it>/<oid>`` instead of
    its recorded location (a verification's restore: the restored ``tablespace_map``
    still names the recorded locations).
    """

    def __init__(
        self,
        target: str | os.PathLike[str],
        options: StripingOptions | None = None,
        *,
        delta: bool = False,
        expected: Sequence[FileRecord] | None = None,
        owner: str | int | None = None,
        fail_at: FailPoint | None = None,
        sync: Literal["fsync", "syncfs"] = "fsync",
        tablespaces_under: str | os.PathLike[str] | None = None,
    ) -> None:
        if delta and expected is None:
            raise ValueError("a delta restore needs expected (the manifest's file records)")
        if fail_at is not None and fail_at.phase is Phase.DURING_FLUSH:
            raise ValueError("a restore sends no FLUSH: use Phase.DURING_CLEAR_ERROR")
        self.options = options if options is not None else StripingOptions()
        self.directory = Path(target).absolute()
        self.delta = delta
        self.expected = tuple(expected) if expected is not None else None
        self.owner = owner
        self.fail_at = fail_at
        self.sync = sync
        self.tablespaces_under = tablespaces_under
        self._ran = False
        self._devices_at_end = 0
        self._writers: list[DeviceWriter] = []
        self._target: RestoreTarget | None = None

    @property
    def direction(self) -> Direction:
        return Direction.RESTORE

    async def run(self, set_name: str, *, registry: Registry | None = None) -> EngineResult:
        if self._ran:
            raise RuntimeError("PgFilesRestore serves one job; build a new one")
        self._ran = True
        target = RestoreTarget(
            self.directory,
            delta=self.delta,
            records=self.expected,
            owner=self.owner,
            tablespaces_under=self.tablespaces_under,
        )
        self._target = target
        try:
            try:
                await threads.run_sync(target.prepare)
            except OSError as exc:
                raise EndpointError(
                    f"cannot prepare the data directory {self.directory}: "
                    f"{exc.strerror or exc} ({exc.filename})"
                ) from exc
            session = session_for(
                set_name,
                self.fail_at,
                registry=registry,
                open_timeout=self.options.open_timeout,
                command_timeout=self.options.command_timeout,
            )
            try:
                return await session.run(self._restore)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await threads.run_sync(self._discard)
                raise
        except EndpointError as exc:
            exc.locate(set_name)
            raise
        finally:
            target.release()

    def _discard(self) -> None:
        for writer in self._writers:
            with contextlib.suppress(OSError):
                writer.abandon()
        if self._target is not None:
            self._target.discard()

    # --- the job ------------------------------------------------------------------------

    async def _restore(self, s: ServerSession) -> EngineResult:
        opts = self.options
        await s.fault(Phase.BEFORE_CONFIGURATION)
        n = s.device_count
        disk = bool(s.client_config.features & Features.RANDOM_ACCESS)
        buffers = opts.buffer_count if opts.buffer_count is not None else BUFFERS_PER_DEVICE * n
        if buffers < n:
            raise s.error(
                f"BUFFERCOUNT={buffers} is less than the {n} devices: a restore reads "
                "every device at once"
            )
        final = await s.configure(
            features=Features.READ_MEDIA,
            block_size=opts.block_size,
            max_transfer_size=opts.max_transfer_size,
            buffer_count=buffers,
            honour_complete=False,
        )
        await s.fault(Phase.AFTER_CONFIGURATION)
        await s.open_devices()
        if disk:
            await s.position_devices()
        target = self._target
        assert target is not None
        expected = {r.path: r for r in self.expected} if self.expected is not None else None
        self._writers = [
            DeviceWriter(
                target,
                index=index,
                device_count=n,
                block_size=opts.block_size,
                set_name=s.set_name,
                label=s.device_label(index),
                expected=expected,
                sync_files=self.sync == "fsync",
            )
            for index in range(n)
        ]
        async with s.task_group() as tasks:
            for index, writer in enumerate(self._writers):
                tasks.start_soon(
                    self._device, s, index, buffers // n, disk, writer, name=f"restore {index}"
                )
        self._check(s)
        await s.fault(Phase.BEFORE_CLOSE)
        self._busy = True  # syncing and finishing move no bytes
        try:
            removed = await threads.run_sync(self._finish)
        except OSError as exc:
            raise EndpointError(
                f"finishing the data directory {self.directory} failed: {exc.strerror or exc} "
                f"({exc.filename})"
            ) from exc
        finally:
            self._busy = False
        await s.close_devices()
        writers = self._writers
        result = PgFilesRestoreResult(
            direction=self.direction,
            set_name=s.set_name,
            devices=s.stats(),
            logical_bytes=sum(w.file_bytes for w in writers),
            features=final.features,
            backup_id=str(writers[0].header.backup_id) if writers[0].header else None,
            written_files=sum(w.written_files for w in writers),
            skipped_files=sum(w.skipped_files for w in writers),
            removed_paths=removed,
        )
        s.log.info(
            "pgfiles_restored",
            directory=str(self.directory),
            delta=self.delta,
            written_files=result.written_files,
            skipped_files=result.skipped_files,
            removed_paths=result.removed_paths,
            bytes=result.logical_bytes,
        )
        return result

    async def _device(
        self, s: ServerSession, index: int, credit: int, disk: bool, writer: DeviceWriter
    ) -> None:
        """READ device ``index``'s stream to its end, each buffer written by ``writer``."""
        schedule = self.options.read_sizes or (self.options.max_transfer_size,)
        sizes = itertools.islice(itertools.cycle(schedule), index % len(schedule), None)
        inflight: deque[_Read] = deque()
        position = 0
        at_end = False
        while True:
            while not at_end and len(inflight) < credit:
                size = next(sizes)
                buffer = await s.allocate(size)
                pending = await s.send(
                    index, CommandCode.READ, size, position if disk else 0, buffer
                )
                position += size
                inflight.append(_Read(pending, buffer, size))
            if not inflight:
                break
            read = inflight.popleft()
            result = await s.result(index, read.pending)
            count = result.bytes_transferred
            if at_end:
                if count or result.completion not in _AFTER_END:
                    raise s.error(
                        f"a READ after the end of the stream completed with "
                        f"{completion_name(result.completion)} and {count} bytes",
                        index,
                        kind=StreamFormatError,
                    )
                s.free(read.buffer)
                continue
            if result.completion in _END_OF_DATA:
                at_end = True
                self._devices_at_end += 1
                if self._devices_at_end == s.device_count:
                    await s.fault(Phase.MID_STREAM)  # the data ended before it fired
            elif result.completion != Completion.SUCCESS:
                raise s.command_failed(index, CommandCode.READ, result.completion)
            elif count != read.size:
                raise s.error(
                    f"a READ of {read.size} bytes completed with SUCCESS but transferred "
                    f"{count} (a short read must report HANDLE_EOF)",
                    index,
                )
            if count:
                s.lent[index] += 1  # the fault hook's "a buffer out" while it is written
                try:
                    await threads.run_sync(writer.consume, read.buffer[:count])
                finally:
                    s.lent[index] -= 1
            s.free(read.buffer)
        await threads.run_sync(writer.finish_stream)
        # The end of data left the device in the I/O-error state (spec §3.7).
        clear = await s.send(index, CommandCode.CLEAR_ERROR)
        await s.fault(Phase.DURING_CLEAR_ERROR, index, sent=[clear])
        await s.expect(index, clear)

    def _check(self, s: ServerSession) -> None:
        """Every device's header agrees, and the index lists exactly what arrived."""
        writers = self._writers
        first = writers[0].header
        assert first is not None  # finish_stream checked every stream
        for index, writer in enumerate(writers):
            header = writer.header
            assert header is not None
            if header.backup_id != first.backup_id:
                raise s.error(
                    f"this stream belongs to backup {header.backup_id}, device "
                    f"{s.device_label(0)!r}'s to {first.backup_id}",
                    index,
                    kind=StreamFormatError,
                )
        index_entry = writers[0].backup_index
        if index_entry is None:
            raise s.error(
                "the first device's stream ends without the backup's index",
                0,
                kind=StreamFormatError,
            )
        labels = [s.device_label(i) or str(i) for i in range(s.device_count)]
        problems = check_arrivals(index_entry, [w.arrived for w in writers], self.expected, labels)
        if problems:
            more = len(problems) - _SHOWN_PROBLEMS
            shown = "; ".join(problems[:_SHOWN_PROBLEMS]) + (
                f"; and {more} more" if more > 0 else ""
            )
            raise s.error(
                f"the restored files do not match the backup's index: {shown}",
                kind=StreamFormatError,
            )

    def _finish(self) -> int:
        """The target's end (module docstring, step 5); the paths removed."""
        target = self._target
        assert target is not None
        if self.delta:
            index = self._writers[0].backup_index
            assert index is not None
            target.remove_extras(r.path for r in index.records)
        if self.sync == "syncfs":
            _syncfs(self.directory)
            for location in target.tablespaces.values():
                _syncfs(Path(os.fsdecode(location)))
        pg_control = next((w.pg_control for w in self._writers if w.pg_control), None)
        target.finish(pg_control)
        return target.removed_paths
