"""SQL Server's side of a VDI transfer: open the set, configure it, drive one thread per device.

Backups send WRITEs (several outstanding per device, each a multiple of BLOCKSIZE up to
MAXTRANSFERSIZE), a FLUSH, then VDC_Complete when negotiated; restores send READs of
MAXTRANSFERSIZE until the device completes one with ERROR_HANDLE_EOF, then a ClearError.
Any failure (an error completion, the client's abort, the serverTimeOut watchdog, a dropped
connection, a server-side failure) aborts the whole set once and becomes the statement's
reason (Msg 3201/3202/3203).
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from standin.mssql import vdss
from standin.mssql.messages import Message, StatementFailed, error, os_error_text
from standin.mssql.stream import (
    BackupPlan,
    FamilyReader,
    FamilyWriter,
    StreamDamaged,
    StreamMalformed,
    round_up,
)

__all__ = ("Run", "Transfer", "abort_quietly", "open_set")

_SLICE_MS = 50
_OPEN_WAIT_S = 5.0


@dataclass
class Run:
    """What the statement's connection and the control API can do to a running transfer."""

    cancel: threading.Event = field(default_factory=threading.Event)
    pace: Callable[[], int | None] = lambda: None
    fail_after: int | None = None  # fail_next_backup: abort after this many bytes
    database: str = ""


def open_set(lib: vdss.VdssLib, name: str, run: Run, wait_s: float = _OPEN_WAIT_S) -> vdss.VdssSet:
    """vdss_open, waiting up to ``wait_s`` for the client's Create (Msg 3201 otherwise)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return lib.open(name, 200)
        except vdss.VdssError as exc:
            if run.cancel.is_set() or time.monotonic() >= deadline:
                raise StatementFailed(
                    error(
                        3201,
                        f"Cannot open backup device '{name}'. Operating system error "
                        f"{vdss.hresult_text(exc.rc)}.",
                    )
                ) from exc


def abort_quietly(lib: vdss.VdssLib | None, name: str, run: Run) -> None:
    """A statement failed before configuration: SQL Server aborts the client's set anyway."""
    if lib is None:
        return
    try:
        vset = open_set(lib, name, run, wait_s=2.0)
    except StatementFailed:
        return
    vset.signal_abort()
    vset.close()


class _Pacer:
    def __init__(self, pace: Callable[[], int | None]) -> None:
        self.pace = pace
        self.lock = threading.Lock()
        self.next = time.monotonic()

    def delay(self, n: int) -> float:
        """0 when ``n`` bytes may go now (and accounts them), else seconds to wait."""
        pace = self.pace()
        now = time.monotonic()
        with self.lock:
            if not pace:
                self.next = now
                return 0.0
            if self.next > now:
                return self.next - now
            self.next = now + n / pace
            return 0.0


class _Hasher(threading.Thread):
    """Hashes one family's chunks in stream order, in its own thread (hashlib frees the GIL)."""

    def __init__(self, writer: FamilyWriter, view: memoryview) -> None:
        super().__init__(name="vd-hash", daemon=True)
        self.writer = writer
        self.view = view
        self.cond = threading.Condition()
        self.queue: deque[tuple[int, int, int]] = deque()
        self.submitted = 0
        self.done = 0
        self.stopping = False

    def submit(self, offset: int, n: int) -> int:
        with self.cond:
            self.submitted += 1
            self.queue.append((self.submitted, offset, n))
            self.cond.notify_all()
            return self.submitted

    def run(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.stopping:
                    self.cond.wait()
                if not self.queue:
                    return
                seq, offset, n = self.queue[0]
            self.writer.sha.update(self.view[offset : offset + n])
            with self.cond:
                self.queue.popleft()
                self.done = seq
                self.cond.notify_all()

    def wait(self, seq: int, timeout: float) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.done >= seq, timeout)

    def drain(self) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.done >= self.submitted)

    def stop(self) -> None:
        """Let it finish what it has (it reads the shared buffers), then end it."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.join()


class _Stop(Exception):
    """This device thread stops because the set failed (the reason is recorded once)."""


class Transfer:
    """One statement's device set, from vdss_open to vdss_close."""

    def __init__(
        self,
        lib: vdss.VdssLib,
        devices: tuple[str, ...],
        run: Run,
        *,
        backup: bool,
        block_size: int,
        max_transfer_size: int,
        buffer_count: int | None,
    ) -> None:
        self.lib = lib
        self.devices = devices
        self.run = run
        self.backup = backup
        self.block_size = block_size
        self.mts = max_transfer_size
        self.buffer_count = buffer_count
        self.vset: vdss.VdssSet | None = None
        self.indices: list[int] = []
        self.failure: list[Message] | None = None
        self.failed = threading.Event()
        self.lock = threading.Lock()
        self.pacer = _Pacer(run.pace)
        self.sent_bytes = 0
        self.server_timeout_ms = 0
        self.complete_enabled = False
        self.slots: list[list[int]] = []
        self.addr = 0
        self.view: memoryview | None = None

    # -- set-up

    def open(self) -> None:
        vset = self.vset = open_set(self.lib, self.devices[0], self.run)
        client = vset.client_config()
        if client.deviceCount != len(self.devices):
            name = self.devices[min(client.deviceCount, len(self.devices) - 1)]
            raise StatementFailed(
                error(
                    3201,
                    f"Cannot open backup device '{name}'. Operating system error "
                    f"0x80770006(VD_E_INVALID): the set has {client.deviceCount} devices, "
                    f"the statement names {len(self.devices)}.",
                )
            )
        for name in self.devices:
            try:
                self.indices.append(vset.open_device(name))
            except vdss.VdssError as exc:
                raise StatementFailed(
                    error(
                        3201,
                        f"Cannot open backup device '{name}'. Operating system error "
                        f"{vdss.hresult_text(exc.rc)}.",
                    )
                ) from exc
        count = len(self.devices)
        cfg = vdss.VDConfig.from_buffer_copy(client)
        cfg.features = client.features | (
            vdss.VDF_WRITE_MEDIA if self.backup else vdss.VDF_READ_MEDIA
        )
        if self.backup and client.features & vdss.VDF_REQUEST_COMPLETE:
            cfg.features |= vdss.VDF_COMPLETE_ENABLED
            self.complete_enabled = True
        cfg.blockSize = self.block_size
        cfg.maxTransferSize = self.mts
        cfg.maxIODepth = 4  # deprecated; always 4
        cfg.bufferAreaSize = self.mts * 4 * count  # deprecated; as SQL Server reports it
        self.server_timeout_ms = client.serverTimeOut
        buffers = max(self.buffer_count or 4 * count, count)
        per_device = min(64, max(1, buffers // count))  # the ring holds 128 commands
        align = max(client.alignment or 1, self.block_size, 4096)
        prefix = round_up(client.prefixZoneSize, align) if client.prefixZoneSize else 0
        stride = prefix + round_up(self.mts, align)
        area = stride * per_device * count
        try:
            self.addr = vset.configure(cfg, area)
        except vdss.VdssError as exc:
            raise self._device_error(0, exc.rc, hresult=True) from exc
        self.view = memoryview((ctypes.c_char * area).from_address(self.addr)).cast("B")
        self.slots = [
            [(d * per_device + k) * stride + prefix for k in range(per_device)]
            for d in range(count)
        ]

    # -- failures

    def _device_error(self, device: int, code: int, *, hresult: bool = False) -> StatementFailed:
        verb, number = ("Write", 3202) if self.backup else ("Read", 3203)
        text = vdss.hresult_text(code) if hresult else os_error_text(code)
        return StatementFailed(error(number, f'{verb} on "{self.devices[device]}" failed: {text}'))

    def fail(self, messages: list[Message]) -> None:
        """Record the first reason and abort the set (idempotent)."""
        with self.lock:
            if self.failure is not None:
                return
            self.failure = messages
            self.failed.set()
        if self.vset is not None:
            self.vset.signal_abort()

    def _guard(self, device: int, body: Callable[[], None]) -> None:
        try:
            body()
        except _Stop:
            pass
        except StatementFailed as exc:
            self.fail(exc.messages)
        except StreamMalformed as exc:
            self.fail(
                [
                    error(
                        3241,
                        f"The media family on device '{self.devices[device]}' is incorrectly "
                        f"formed. SQL Server cannot process this media family. ({exc})",
                    )
                ]
            )
        except StreamDamaged as exc:
            self.fail(
                [
                    error(
                        3183,
                        f"RESTORE detected an error on page (1:{exc.page}) in database "
                        f'"{self.run.database}" as read from the backup set. ({exc})',
                    )
                ]
            )
        except Exception as exc:
            self.fail([error(3013, f"internal error on device '{self.devices[device]}': {exc!r}")])

    def _run_threads(self, target: Callable[[int], None]) -> None:
        threads = [
            threading.Thread(
                target=self._guard, args=(d, lambda d=d: target(d)), name=f"vd-{d}", daemon=True
            )
            for d in range(len(self.devices))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if self.failure is not None:
            raise StatementFailed(*self.failure)

    # -- per device primitives

    def _poll(
        self, device: int, timeout_ms: int, waiting: bool, since: list[float]
    ) -> tuple[int, int, int] | None:
        """One sliced wait: ``(tag, completion, bytes)`` or None; raises when the set fails."""
        assert self.vset is not None
        if self.failed.is_set():
            raise _Stop
        if self.run.cancel.is_set():
            self.fail([error(3013, "The statement was cancelled: its connection closed.")])
            raise _Stop
        rc, tag, completion, nbytes, _ = self.vset.wait(self.indices[device], timeout_ms)
        if rc == vdss.NOERROR:
            since[0] = time.monotonic()
            return tag, completion, nbytes
        if self.failed.is_set():
            raise _Stop
        if rc == vdss.VD_E_ABORT:
            raise self._device_error(device, vdss.ERROR_OPERATION_ABORTED)
        if rc != vdss.VD_E_TIMEOUT:
            raise self._device_error(device, rc, hresult=True)
        limit = self.server_timeout_ms
        # spec §5.5: more than two serverTimeOut intervals without a completion aborts the set
        if waiting and limit and time.monotonic() - since[0] > 2 * limit / 1000:
            raise self._device_error(device, vdss.ERROR_TIMEOUT)
        if not waiting:
            since[0] = time.monotonic()
        return None

    def _command(self, device: int, code: int) -> None:
        """Send a buffer-less command (FLUSH, COMPLETE, CLEAR_ERROR) and await its success."""
        assert self.vset is not None
        tag = self._send(device, code, 0, 0)
        since = [time.monotonic()]
        while True:
            got = self._poll(device, _SLICE_MS, True, since)
            if got is None:
                continue
            if got[0] != tag:
                continue
            if got[1] != vdss.ERROR_SUCCESS:
                raise self._device_error(device, got[1])
            return

    def _send(self, device: int, code: int, size: int, offset: int) -> int:
        assert self.vset is not None
        try:
            return self.vset.send(self.indices[device], code, size, 0, offset)
        except vdss.VdssError as exc:
            if self.failed.is_set():
                raise _Stop from exc
            if exc.rc == vdss.VD_E_ABORT:
                raise self._device_error(device, vdss.ERROR_OPERATION_ABORTED) from exc
            raise self._device_error(device, exc.rc, hresult=True) from exc

    def _pace(self, n: int) -> float:
        return self.pacer.delay(n)

    # -- backup

    def write(self, plan: BackupPlan) -> list[FamilyWriter]:
        """Send every family's stream; returns the writers (digests) once all are flushed."""
        writers = [FamilyWriter(plan, f) for f in range(len(self.devices))]
        cond = threading.Condition()
        arrived = [0]

        def device(d: int) -> None:
            self._write_device(d, writers[d])
            self._command(d, vdss.VDC_FLUSH)
            self._await_all(d, cond, arrived)
            if self.complete_enabled:
                self._command(d, vdss.VDC_COMPLETE)

        self._run_threads(device)
        return writers

    def _await_all(self, d: int, cond: threading.Condition, arrived: list[int]) -> None:
        """Wait until every device got here (all flushed), still watching for an abort."""
        with cond:
            arrived[0] += 1
            cond.notify_all()
        since = [time.monotonic()]
        while True:
            with cond:
                if arrived[0] >= len(self.devices):
                    return
                cond.wait(_SLICE_MS / 1000)
            self._poll(d, 0, False, since)

    def _write_device(self, d: int, writer: FamilyWriter) -> None:
        assert self.vset is not None
        assert self.view is not None
        free = list(self.slots[d])
        hashed_wait: list[tuple[int, int]] = []  # completed slots whose bytes are still hashed
        outstanding: dict[int, tuple[int, int, int]] = {}
        since = [time.monotonic()]
        # SHA-256 of the stream runs beside rendering and sending: the second core's share
        hasher = _Hasher(writer, self.view)
        hasher.start()
        try:
            while True:
                wait_ms = _SLICE_MS
                free += [slot for slot, seq in hashed_wait if seq <= hasher.done]
                hashed_wait = [(slot, seq) for slot, seq in hashed_wait if seq > hasher.done]
                while free and writer.pos < writer.total:
                    n = min(self.mts, writer.total - writer.pos)
                    delay = self._pace(n)
                    if delay:
                        wait_ms = max(1, min(_SLICE_MS, int(delay * 1000)))
                        break
                    slot = free.pop()
                    seq = 0
                    if writer.reaches_trailer(n):
                        hasher.drain()
                        writer.render(self.addr, self.view, slot, n)
                    else:
                        writer.render(self.addr, self.view, slot, n, hash=False)
                        seq = hasher.submit(slot, n)
                    tag = self._send(d, vdss.VDC_WRITE, n, slot)
                    if not outstanding:
                        since[0] = time.monotonic()
                    outstanding[tag] = (slot, n, seq)
                    self._count(n)
                if not outstanding and writer.pos >= writer.total:
                    hasher.drain()
                    return
                if not outstanding and hashed_wait:
                    hasher.wait(hashed_wait[0][1], _SLICE_MS / 1000)
                    continue
                got = self._poll(d, wait_ms, bool(outstanding), since)
                if got is None or got[0] not in outstanding:
                    continue
                tag, completion, nbytes = got
                slot, n, seq = outstanding.pop(tag)
                if completion != vdss.ERROR_SUCCESS:
                    raise self._device_error(d, completion)
                if nbytes != n:
                    raise self._device_error(d, vdss.ERROR_DISK_FULL)
                hashed_wait.append((slot, seq))
        finally:
            hasher.stop()

    def _count(self, n: int) -> None:
        with self.lock:
            self.sent_bytes += n
            over = self.run.fail_after is not None and self.sent_bytes >= self.run.fail_after
        if over:
            # the server side fails mid-stream (fail_next_backup): SQL Server aborts the set
            self.fail(
                [
                    error(
                        3202,
                        f'Write on "{self.devices[0]}" failed: '
                        f"{os_error_text(vdss.ERROR_OPERATION_ABORTED)}",
                    )
                ]
            )
            raise _Stop

    # -- restore

    def read_headers(self) -> list[FamilyReader]:
        """Phase 1: one READ per device until its header is known (or its stream ended)."""
        readers = [FamilyReader() for _ in self.devices]
        self.eof = [False] * len(self.devices)

        def device(d: int) -> None:
            while readers[d].header is None and not self.eof[d]:
                self._read_some(d, readers[d], limit=1)

        self._run_threads(device)
        return readers

    def read_all(self, readers: list[FamilyReader]) -> None:
        """Phase 2: READs (several outstanding) until EOF, then ClearError, on every device."""

        def device(d: int) -> None:
            while not self.eof[d]:
                self._read_some(d, readers[d], limit=None)
            self._command(d, vdss.VDC_CLEAR_ERROR)

        self._run_threads(device)

    def _read_some(self, d: int, reader: FamilyReader, limit: int | None) -> None:
        assert self.vset is not None
        assert self.view is not None
        free = list(self.slots[d] if limit is None else self.slots[d][:limit])
        pending: deque[tuple[int, int]] = deque()
        done: dict[int, tuple[int, int]] = {}
        since = [time.monotonic()]
        sent = 0
        while True:
            wait_ms = _SLICE_MS
            while free and not self.eof[d] and (limit is None or sent < limit):
                delay = self._pace(self.mts)
                if delay:
                    wait_ms = max(1, min(_SLICE_MS, int(delay * 1000)))
                    break
                slot = free.pop()
                tag = self._send(d, vdss.VDC_READ, self.mts, slot)
                if not pending:
                    since[0] = time.monotonic()
                pending.append((tag, slot))
                sent += 1
            if not pending:
                return
            got = self._poll(d, wait_ms, True, since)
            if got is None:
                continue
            done[got[0]] = (got[1], got[2])
            while pending and pending[0][0] in done:
                tag, slot = pending.popleft()
                completion, nbytes = done.pop(tag)
                free.append(slot)
                if self.eof[d]:
                    continue  # reads sent before the end was seen: nothing more to take
                if completion in (
                    vdss.ERROR_SUCCESS,
                    vdss.ERROR_HANDLE_EOF,
                    vdss.ERROR_NO_DATA_DETECTED,
                ):
                    if nbytes > self.mts:
                        raise self._device_error(d, vdss.ERROR_IO_DEVICE)
                    if nbytes:
                        reader.feed(self.view[slot : slot + nbytes])
                    if completion != vdss.ERROR_SUCCESS or nbytes == 0:
                        self.eof[d] = True
                else:
                    raise self._device_error(d, completion)

    # -- the end

    def close_devices(self) -> None:
        assert self.vset is not None
        for index in self.indices:
            self.vset.close_device(index)

    def close(self, *, abort: bool) -> None:
        """vdss_close; aborts the set first when the statement did not succeed."""
        if self.vset is None:
            return
        if abort or self.failure is not None:
            self.vset.signal_abort()
        self.view = None
        self.vset.close()
