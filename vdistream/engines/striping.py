"""A SQL-Server-like striping engine: the server side of a striped BACKUP or RESTORE (spec §6).

``StripedBackup(source)`` and ``StripedRestore(target)`` are ``Engine``\\s (see
``vdistream.engines.base`` for the contract). They are the engine of the tests and
benchmarks and the template of real engines: an engine that gets its bytes elsewhere
(a subprocess, SQLite) passes its own ``ByteProducer``/``ByteConsumer``.

Options (``StripingOptions``) follow T-SQL: ``block_size`` (BLOCKSIZE, default 64 KiB
here), ``buffer_count`` (BUFFERCOUNT, the total number of buffers shared by all devices;
default 2 per device), ``max_transfer_size`` (MAXTRANSFERSIZE, default 1 MiB), and
``honour_complete`` (grant the client's REQUEST_COMPLETE). The mode comes from the
client: ``Features.RANDOM_ACCESS`` in its configuration makes the devices disk-like,
anything else is treated as pipe-like (sequential).

Backup, in order:

1. ``begin_configuration`` with WRITE_MEDIA (plus READ_MEDIA when disk-like),
   ``request_buffers(max_transfer_size, 0, buffer_count)``, ``end_configuration``;
2. open every device by name, wait until the set is active; disk-like devices get a
   ``SET_POSITION`` to 0 first, as SQL Server positions its media;
3. one header block WRITE per device, then the source in chunks of
   ``max_transfer_size`` bytes, chunk ``k`` to device ``k % N`` (the stream format is in
   ``vdistream.engines.framing``), then one trailer block WRITE per device. Writes
   carry ``position`` (the byte offset in that device's stream) when disk-like. Every
   buffer comes from the set's pool, so BUFFERCOUNT bounds the commands in flight over
   all devices; a buffer is reused once its WRITE completed;
4. when every WRITE has completed: FLUSH on every device; then COMPLETE on every
   device when the final configuration has COMPLETE_ENABLED; then ``close_device`` on
   every device and ``close``.

Restore, in order:

1. configuration with READ_MEDIA (and BUFFERCOUNT >= the device count: each device
   gets ``buffer_count // N`` buffers of its own, so that no device can starve another);
2. open the devices (SET_POSITION to 0 when disk-like);
3. on each device, READs of the sizes ``read_sizes`` cycles through (multiples of the
   block size up to MAXTRANSFERSIZE; by default MAXTRANSFERSIZE itself, the fewest
   commands: the parser does not depend on the sizes, which tests vary), several
   outstanding, handled in stream order. A READ that
   completes with HANDLE_EOF or NO_DATA_DETECTED ends the stream: the engine lets the
   device's other READs complete, then sends CLEAR_ERROR and expects SUCCESS (spec
   §3.7, §3.8, §6.3). Each stream is parsed and verified (header, length, trailer,
   CRC-32) and the chunks are reassembled in order into the target, zero copy from
   the read buffers;
4. the target's ``finish()`` (the image is complete and verified), then
   ``close_device`` on every device and ``close``.

Any failure aborts the set, closes it and raises (``EngineError`` and subclasses; a
malformed restore stream is a ``StreamFormatError`` naming the device). The target's
``discard()`` is called when a restore fails. ``fail_at`` injects faults
(``vdistream.engines.faults``). An engine object serves one job: ``run`` once.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
import itertools
import uuid
from collections import deque
from collections.abc import Callable, Sequence

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from vdistream.engines.base import (
    Direction,
    Engine,
    EngineError,
    EngineResult,
    StreamFormatError,
    completion_name,
)
from vdistream.engines.faults import FailPoint, Phase, session_for
from vdistream.engines.framing import (
    FLAG_DISK_LIKE,
    DeviceStreamParser,
    StreamHeader,
    StreamTrailer,
    chunk_count,
    crc32,
    device_chunk_count,
    device_payload_length,
    round_up,
)
from vdistream.engines.session import DeviceQueue, PendingWrite, ServerSession, device_queues
from vdistream.engines.streams import ConsumerLike, ProducerLike, as_consumer, as_producer
from vdistream.protocol import CommandCode, Completion, Features, VDConfig
from vdistream.protocol.config import valid_block_size, valid_max_transfer_size
from vdistream.vdi import Registry
from vdistream.vdi.contract import PendingResult

__all__ = ("StripedBackup", "StripedRestore", "StripingOptions")

DEFAULT_BLOCK_SIZE = 65536
DEFAULT_MAX_TRANSFER_SIZE = 1 << 20
BUFFERS_PER_DEVICE = 2

#: Completions that end a restore stream (spec §3.8; FILEMARK_DETECTED is not one:
#: this engine writes no filemarks, so meeting one is a failure).
_END_OF_DATA = frozenset({Completion.HANDLE_EOF, Completion.NO_DATA_DETECTED})
#: What READs still outstanding at the end of a stream may complete with: the end
#: again, or IO_DEVICE for those the device refused once it entered the error state.
_AFTER_END = _END_OF_DATA | {Completion.IO_DEVICE}


@dataclasses.dataclass(frozen=True, slots=True)
class StripingOptions:
    """The T-SQL options of the striped BACKUP / RESTORE (module docstring).

    ``read_sizes`` (restore only) is the cycle of READ sizes; ``None``: every READ is
    ``max_transfer_size`` (a mix with 1-block READs cost a restore ~10 % more CPU).
    ``open_timeout`` bounds the wait for the client to open every device;
    ``command_timeout`` bounds every wait for a completion or a free buffer (``None``:
    no bound other than cancellation and the set's own ``server_timeout_ms`` watchdog).
    """

    block_size: int = DEFAULT_BLOCK_SIZE
    buffer_count: int | None = None
    max_transfer_size: int = DEFAULT_MAX_TRANSFER_SIZE
    honour_complete: bool = True
    read_sizes: tuple[int, ...] | None = None
    open_timeout: float | None = 60.0
    command_timeout: float | None = None

    def __post_init__(self) -> None:
        if not valid_block_size(self.block_size):
            raise ValueError(f"block_size={self.block_size} is not a power of two in 512..65536")
        if not valid_max_transfer_size(self.max_transfer_size):
            raise ValueError(
                f"max_transfer_size={self.max_transfer_size} is not a multiple of 64 KiB "
                "in 64 KiB..4 MiB"
            )
        if self.buffer_count is not None and self.buffer_count < 1:
            raise ValueError(f"buffer_count={self.buffer_count} must be at least 1")
        if self.read_sizes is not None:
            if not self.read_sizes:
                raise ValueError("read_sizes must not be empty")
            for size in self.read_sizes:
                if size % self.block_size or not self.block_size <= size <= self.max_transfer_size:
                    raise ValueError(
                        f"read size {size} is not a multiple of block_size={self.block_size} "
                        f"between block_size and max_transfer_size={self.max_transfer_size}"
                    )

    def buffers_for(self, devices: int) -> int:
        """BUFFERCOUNT for a set of ``devices`` devices."""
        return self.buffer_count if self.buffer_count is not None else BUFFERS_PER_DEVICE * devices

    def read_schedule(self) -> tuple[int, ...]:
        """The READ sizes a restore cycles through."""
        if self.read_sizes is not None:
            return self.read_sizes
        return (self.max_transfer_size,)


class _Striped(Engine):
    """What backup and restore share: options, fault point, one run per object.

    ``run`` claims the object, then ``_serve`` does the job; ``vdistream.engines.scoped``
    wraps ``_serve`` in its endpoint's scope.
    """

    def __init__(self, options: StripingOptions | None, fail_at: FailPoint | None) -> None:
        self.options = options if options is not None else StripingOptions()
        self.fail_at = fail_at
        self._ran = False

    async def run(self, set_name: str, *, registry: Registry | None = None) -> EngineResult:
        self._claim()
        return await self._serve(set_name, registry)

    @abc.abstractmethod
    async def _serve(self, set_name: str, registry: Registry | None) -> EngineResult:
        """The job on the set, from open to close."""

    def _claim(self) -> None:
        if self._ran:
            raise RuntimeError(f"{type(self).__name__} serves one job; build a new one")
        self._ran = True

    def _session(self, set_name: str, registry: Registry | None) -> ServerSession:
        return session_for(
            set_name,
            self.fail_at,
            registry=registry,
            open_timeout=self.options.open_timeout,
            command_timeout=self.options.command_timeout,
        )

    async def _open(
        self, s: ServerSession, disk: bool, features: int, buffers: int, complete: bool
    ) -> VDConfig:
        """Configure the set, open the devices and position disk-like ones; the final
        configuration."""
        final = await s.configure(
            features=features,
            block_size=self.options.block_size,
            max_transfer_size=self.options.max_transfer_size,
            buffer_count=buffers,
            honour_complete=complete,
        )
        await s.fault(Phase.AFTER_CONFIGURATION)
        await s.open_devices()
        if disk:
            await s.position_devices()
        return final

    async def _result(
        self, s: ServerSession, total: int, final: VDConfig, backup_id: uuid.UUID
    ) -> EngineResult:
        """Close the devices; what the job did."""
        await s.close_devices()
        return EngineResult(
            direction=self.direction,
            set_name=s.set_name,
            devices=s.stats(),
            logical_bytes=total,
            features=final.features,
            backup_id=str(backup_id),
        )


# --- backup --------------------------------------------------------------------------


class StripedBackup(_Striped):
    """BACKUP ... TO VIRTUAL_DEVICE = ... from ``source`` (module docstring)."""

    def __init__(
        self,
        source: ProducerLike,
        options: StripingOptions | None = None,
        *,
        fail_at: FailPoint | None = None,
        backup_id: uuid.UUID | None = None,
    ) -> None:
        super().__init__(options, fail_at)
        if fail_at is not None and fail_at.phase is Phase.DURING_CLEAR_ERROR:
            raise ValueError("a backup sends no CLEAR_ERROR: use Phase.DURING_FLUSH")
        self.producer = as_producer(source)
        self.backup_id = backup_id if backup_id is not None else uuid.uuid4()

    @property
    def direction(self) -> Direction:
        return Direction.BACKUP

    async def _serve(self, set_name: str, registry: Registry | None) -> EngineResult:
        session = self._session(set_name, registry)
        try:
            result = await session.run(self._backup)
        except BaseException:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await self.producer.aclose()  # the engine's own error is the one to see
            raise
        try:
            await self.producer.aclose()
        except Exception as exc:
            raise EngineError(f"closing the producer failed: {exc}", set_name=set_name) from exc
        return result

    async def _backup(self, s: ServerSession) -> EngineResult:
        opts = self.options
        await s.fault(Phase.BEFORE_CONFIGURATION)
        disk = bool(s.client_config.features & Features.RANDOM_ACCESS)
        media = Features.WRITE_MEDIA | (Features.READ_MEDIA if disk else 0)
        buffers = opts.buffers_for(s.device_count)
        final = await self._open(s, disk, media, buffers, opts.honour_complete)
        total = await self._write_streams(s, disk)
        await s.end_streams(complete=bool(final.features & Features.COMPLETE_ENABLED))
        await s.fault(Phase.BEFORE_CLOSE)
        self._busy = False
        return await self._result(s, total, final, self.backup_id)

    async def _write_streams(self, s: ServerSession, disk: bool) -> int:
        """Header, striped chunks and trailer on every device; the logical length."""
        n = s.device_count
        block, chunk = self.options.block_size, self.options.max_transfer_size
        positions = [0] * n
        crcs = [0] * n
        payload = [0] * n
        chunks = [0] * n
        total = 0
        with contextlib.ExitStack() as streams:
            # One queue per device of the WRITEs to await in order.
            queues: list[DeviceQueue[PendingWrite]] = device_queues(streams, n)
            async with s.task_group() as tasks:
                for index, (_, receive) in enumerate(queues):
                    tasks.start_soon(s.await_writes, index, receive, name=f"writes {index}")

                async def write(index: int, buffer: memoryview, size: int) -> None:
                    position = positions[index] if disk else 0
                    pending = await s.send(index, CommandCode.WRITE, size, position, buffer[:size])
                    positions[index] += size
                    queues[index][0].send_nowait(PendingWrite(pending, buffer))

                flags = FLAG_DISK_LIKE if disk else 0
                for index in range(n):
                    buffer = await s.allocate(block)
                    StreamHeader(self.backup_id, index, n, block, chunk, flags).pack_into(buffer)
                    await write(index, buffer, block)
                for number in itertools.count():
                    buffer = await s.allocate(chunk)
                    filled = await self._fill(s, buffer)
                    if not filled:
                        s.free(buffer)
                        break
                    size = round_up(filled, block)
                    buffer[filled:size] = bytes(size - filled)  # the last chunk's padding
                    index = number % n
                    payload[index] += size
                    chunks[index] += 1
                    total += filled
                    await write(index, buffer, size)
                    # ISA-L's CRC-32 (framing.crc32) takes ~90 µs a MiB: less than a
                    # thread hop would cost the loop, so it is taken right here.
                    crcs[index] = crc32(buffer[:size], crcs[index])
                    if filled < chunk:
                        break  # _fill only comes back short at the end of the source
                await s.fault(Phase.MID_STREAM)  # the data ended before it fired
                for index in range(n):
                    buffer = await s.allocate(block)
                    StreamTrailer(
                        self.backup_id,
                        index,
                        n,
                        total,
                        payload[index],
                        chunks[index],
                        crcs[index],
                    ).pack_into(buffer)
                    await write(index, buffer, block)
                for send, _ in queues:
                    send.close()  # lets each device's task finish once it awaited all
        return total

    async def _fill(self, s: ServerSession, buffer: memoryview) -> int:
        """Fill ``buffer`` from the source; short only at the end of the source."""
        filled = 0
        while filled < buffer.nbytes:
            try:
                count = await self.producer.readinto(buffer[filled:])
            except Exception as exc:
                raise s.error(f"the producer failed: {type(exc).__name__}: {exc}") from exc
            if not 0 <= count <= buffer.nbytes - filled:
                raise s.error(
                    f"the producer reported {count} bytes for a buffer of {buffer.nbytes - filled}"
                )
            if not count:
                break
            filled += count
        return filled


# --- restore -------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _Read:
    pending: PendingResult
    buffer: memoryview
    size: int


@dataclasses.dataclass(slots=True)
class _Header:
    header: StreamHeader


@dataclasses.dataclass(slots=True)
class _Piece:
    """Payload bytes in stream order; ``release`` (if any) gives the read buffer back."""

    data: memoryview
    release: Callable[[], None] | None


@dataclasses.dataclass(slots=True)
class _End:
    final: bytes  # the last payload block (b"" if the payload is empty)
    trailer: StreamTrailer


_Item = _Header | _Piece | _End


class StripedRestore(_Striped):
    """RESTORE ... FROM VIRTUAL_DEVICE = ... into ``target`` (module docstring)."""

    def __init__(
        self,
        target: ConsumerLike,
        options: StripingOptions | None = None,
        *,
        fail_at: FailPoint | None = None,
    ) -> None:
        super().__init__(options, fail_at)
        if fail_at is not None and fail_at.phase is Phase.DURING_FLUSH:
            raise ValueError("a restore sends no FLUSH: use Phase.DURING_CLEAR_ERROR")
        self.consumer = as_consumer(target)
        self._devices_at_end = 0

    @property
    def direction(self) -> Direction:
        return Direction.RESTORE

    async def _serve(self, set_name: str, registry: Registry | None) -> EngineResult:
        session = self._session(set_name, registry)
        try:
            return await session.run(self._restore)
        except BaseException:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await self.consumer.discard()  # the engine's own error is the one to see
            raise

    async def _restore(self, s: ServerSession) -> EngineResult:
        opts = self.options
        await s.fault(Phase.BEFORE_CONFIGURATION)
        n = s.device_count
        disk = bool(s.client_config.features & Features.RANDOM_ACCESS)
        buffers = opts.buffers_for(n)
        if buffers < n:
            raise s.error(
                f"BUFFERCOUNT={buffers} is less than the {n} devices: a restore reads "
                "every device at once"
            )
        # A restore never sends COMPLETE.
        final = await self._open(s, disk, Features.READ_MEDIA, buffers, complete=False)
        with contextlib.ExitStack() as streams:
            # Per device, what its reader parsed, in stream order (each device holds at
            # most buffer_count // n read buffers).
            queues: list[DeviceQueue[_Item]] = device_queues(streams, n)
            async with s.task_group() as tasks:
                for index, (send, _) in enumerate(queues):
                    tasks.start_soon(
                        self._read_device,
                        s,
                        index,
                        buffers // n,
                        disk,
                        send,
                        name=f"reads {index}",
                    )
                total, backup_id = await self._assemble(s, [receive for _, receive in queues])
        await s.fault(Phase.BEFORE_CLOSE)
        try:
            self._busy = True  # finishing (e.g. verifying an image) moves no bytes
            await self.consumer.finish()
        except Exception as exc:
            raise s.error(f"the consumer failed to finish: {type(exc).__name__}: {exc}") from exc
        return await self._result(s, total, final, backup_id)

    # --- one device's reader ------------------------------------------------------

    async def _read_device(
        self,
        s: ServerSession,
        index: int,
        credit: int,
        disk: bool,
        out: MemoryObjectSendStream[_Item],
    ) -> None:
        """READ one device's stream to its end, in order, parsed into ``out``."""
        parser = DeviceStreamParser(
            block_size=self.options.block_size,
            device_index=index,
            device_count=s.device_count,
            set_name=s.set_name,
            device=s.device_label(index),
        )
        schedule = self.options.read_schedule()
        # Devices start at different points of the cycle, so their sizes differ too.
        sizes = itertools.islice(itertools.cycle(schedule), index % len(schedule), None)
        # A buffer counts against the credit from its READ until the assembler has
        # used every byte of it: a device can never hold the buffers another one needs.
        credits = anyio.Semaphore(credit)
        inflight: deque[_Read] = deque()
        position = 0
        at_end = False
        announced = False
        with out:
            while True:
                while not at_end and credits.value:
                    credits.acquire_nowait()
                    size = next(sizes)
                    buffer = await s.allocate(size)
                    pending = await s.send(
                        index, CommandCode.READ, size, position if disk else 0, buffer
                    )
                    position += size
                    inflight.append(_Read(pending, buffer, size))
                if not inflight:
                    if at_end:
                        break
                    await credits.acquire()  # the assembler holds them all: wait for one
                    credits.release()
                    continue
                read = inflight.popleft()
                result = await s.result(index, read.pending)
                if at_end:
                    # A READ sent before the end showed up: it must carry no data.
                    if result.bytes_transferred or result.completion not in _AFTER_END:
                        raise s.error(
                            f"a READ after the end of the stream completed with "
                            f"{completion_name(result.completion)} and "
                            f"{result.bytes_transferred} bytes",
                            index,
                            kind=StreamFormatError,
                        )
                    self._give_back(s, read.buffer, credits)
                    continue
                if result.completion in _END_OF_DATA:
                    at_end = True
                    self._devices_at_end += 1
                    if self._devices_at_end == s.device_count:
                        await s.fault(Phase.MID_STREAM)  # the data ended before it fired
                elif result.completion != Completion.SUCCESS:
                    raise s.command_failed(index, CommandCode.READ, result.completion)
                elif result.bytes_transferred != read.size:
                    raise s.error(
                        f"a READ of {read.size} bytes completed with SUCCESS but transferred "
                        f"{result.bytes_transferred} (a short read must report HANDLE_EOF)",
                        index,
                    )
                pieces = parser.feed(read.buffer[: result.bytes_transferred])
                if parser.header is not None and not announced:
                    out.send_nowait(_Header(parser.header))
                    announced = True
                lent = False
                for piece in pieces:
                    if isinstance(piece, memoryview):
                        lent = True  # the buffer goes back once the assembler used it
                        s.lent[index] += 1
                        release = functools.partial(self._give_back, s, read.buffer, credits, index)
                        out.send_nowait(_Piece(piece, release))
                    else:
                        out.send_nowait(_Piece(memoryview(piece), None))
                if not lent:
                    self._give_back(s, read.buffer, credits)
            final, trailer = parser.finish()
            out.send_nowait(_End(final, trailer))
        # The end of data left the device in the I/O-error state (spec §3.7).
        clear = await s.send(index, CommandCode.CLEAR_ERROR)
        await s.fault(Phase.DURING_CLEAR_ERROR, index, sent=[clear])
        await s.expect(index, clear)

    @staticmethod
    def _give_back(
        s: ServerSession,
        buffer: memoryview,
        credits: anyio.Semaphore,
        lent_by: int | None = None,
    ) -> None:
        if lent_by is not None:
            s.lent[lent_by] -= 1
        s.free(buffer)
        credits.release()

    # --- reassembly ----------------------------------------------------------------

    async def _assemble(
        self, s: ServerSession, queues: Sequence[MemoryObjectReceiveStream[_Item]]
    ) -> tuple[int, uuid.UUID]:
        """Chunks in backup order from the device queues into the consumer, verified."""
        n = len(queues)
        headers = [(await self._next(s, i, queue)) for i, queue in enumerate(queues)]
        first = headers[0]
        assert isinstance(first, _Header)  # each reader sends its header first
        reference = first.header
        for index, item in enumerate(headers):
            assert isinstance(item, _Header)
            if item.header.backup_id != reference.backup_id:
                raise s.error(
                    f"this stream belongs to backup {item.header.backup_id}, the stream of "
                    f"device {s.device_label(0)!r} to backup {reference.backup_id}",
                    index,
                    kind=StreamFormatError,
                )
            if item.header.chunk_size != reference.chunk_size:
                raise s.error(
                    f"chunk size {item.header.chunk_size} differs from device "
                    f"{s.device_label(0)!r}'s {reference.chunk_size}",
                    index,
                    kind=StreamFormatError,
                )
        chunk_size = reference.chunk_size
        held: list[_Piece | None] = [None] * n  # the unused rest of a piece, per device
        trailers: list[StreamTrailer | None] = [None] * n
        total: int | None = None  # the backup's length, once a trailer told it
        written = 0
        chunks = 0
        while True:
            index = chunks % n
            if trailers[index] is not None:
                break  # this device has no more chunks: the backup ended before this one
            got = 0
            while got < chunk_size and trailers[index] is None:
                piece = held[index]
                held[index] = None
                if piece is None:
                    item = await self._next(s, index, queues[index])
                    if isinstance(item, _End):
                        trailers[index] = item.trailer
                        total = self._agree(s, index, total, item.trailer)
                        final = item.final
                        if got + len(final) > chunk_size:
                            raise self._layout_error(s, index, "a chunk longer than the chunk size")
                        # The final block of the backup's last chunk holds its padding.
                        keep = min(len(final), max(0, total - written))
                        if final[keep:] != bytes(len(final) - keep):
                            raise self._layout_error(s, index, "non-zero bytes after the end")
                        if keep:
                            await self._deliver(s, memoryview(final)[:keep])
                            written += keep
                        got += len(final)
                        break
                    if not isinstance(item, _Piece):
                        raise self._layout_error(s, index, "a second header")
                    piece = item
                take = min(chunk_size - got, piece.data.nbytes)
                await self._deliver(s, piece.data[:take])
                written += take
                got += take
                if take < piece.data.nbytes:
                    held[index] = _Piece(piece.data[take:], piece.release)
                elif piece.release is not None:
                    piece.release()
            if not got:
                break  # the device's payload ended exactly before this chunk
            chunks += 1
            if got < chunk_size:
                break  # a short chunk is the backup's last one
        # Every device must be at its end now, with nothing left over.
        for index in range(n):
            if held[index] is not None:
                raise self._layout_error(s, index, "payload beyond the end of the backup")
            if trailers[index] is None:
                item = await self._next(s, index, queues[index])
                if not isinstance(item, _End) or item.final:
                    raise self._layout_error(s, index, "payload beyond the end of the backup")
                trailers[index] = item.trailer
                total = self._agree(s, index, total, item.trailer)
        assert total is not None  # every device delivered its trailer
        if written != total or chunks != chunk_count(total, chunk_size):
            raise s.error(
                f"the streams hold {written} bytes in {chunks} chunks; the trailers promise "
                f"{total} bytes in {chunk_count(total, chunk_size)} chunks (a stream is "
                "missing chunks)",
                kind=StreamFormatError,
            )
        for index, trailer in enumerate(trailers):
            assert trailer is not None
            want_chunks = device_chunk_count(total, chunk_size, n, index)
            want_bytes = device_payload_length(total, chunk_size, reference.block_size, n, index)
            if (trailer.chunk_count, trailer.payload_length) != (want_chunks, want_bytes):
                raise self._layout_error(
                    s,
                    index,
                    f"{trailer.chunk_count} chunks in {trailer.payload_length} bytes where a "
                    f"backup of {total} bytes over {n} devices puts {want_chunks} chunks in "
                    f"{want_bytes} bytes",
                )
        return written, reference.backup_id

    async def _next(
        self, s: ServerSession, index: int, queue: MemoryObjectReceiveStream[_Item]
    ) -> _Item:
        try:
            return await queue.receive()
        except anyio.EndOfStream:
            raise s.error("the device's reader stopped early", index) from None

    async def _deliver(self, s: ServerSession, view: memoryview) -> None:
        try:
            await self.consumer.write(view)
        except Exception as exc:
            raise s.error(f"the consumer failed: {type(exc).__name__}: {exc}") from exc

    @staticmethod
    def _agree(s: ServerSession, index: int, total: int | None, trailer: StreamTrailer) -> int:
        """The backup's length: every trailer must state the same one."""
        if total is not None and trailer.total_length != total:
            raise s.error(
                f"the trailer gives the backup {trailer.total_length} bytes, another device's "
                f"{total}",
                index,
                kind=StreamFormatError,
            )
        return trailer.total_length

    @staticmethod
    def _layout_error(s: ServerSession, index: int, what: str) -> EngineError:
        return s.error(
            f"the stream does not fit the backup's layout: {what}", index, kind=StreamFormatError
        )
