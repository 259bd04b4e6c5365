"""One device's whole life: open its stream, serve its commands, commit or abort, report.

A :class:`Pump` builds the stage chain around its device's sink (backup) or source
(restore), serves the device's commands one at a time in stream order (the engine keeps
several outstanding), waits for the job's decision, commits or aborts the sink, and
returns a frozen :class:`DeviceOutcome`. Pumps run one per device, in the job's task
group (spec §1.4), whose deadline and stall watchdog bound every wait: no polling.

Command handling (spec §3.3, §3.5):

============  ==============================================================
WRITE         ``sink.write`` (at ``position`` on a disk-like device)
READ          ``source.readinto``; a short read completes with HANDLE_EOF
FLUSH         ``sink.flush`` (durable); nothing to do on restore
COMPLETE      ``sink.flush``: the backup is hardened before the engine hears it
              is complete; the sinks are *published* (committed) only when
              every device finished, so a failure on another device cannot
              leave part of a backup visible
CLEAR_ERROR   success
DISCARD       success, and the job is marked abandoned by the engine
GET/SET_POSITION  disk-like devices only
anything else NOT_SUPPORTED
============  ==============================================================

Bandwidth: a WRITE waits for its bytes under the job's limits (``vdistream.throttle``)
before its sink write, a READ after its source read (for the bytes it got), before the
command completes, so the engine moves no faster than the limits allow. With no limit
set the cost is one check of the limits' rates per command.

A storage or pipeline failure (a corrupt or undecryptable stream) completes the command
with an error code the engine understands (DISK_FULL when the medium is full, else a
read or write ``Fault``) and is then raised, so that the job aborts with the storage
error as its cause.

Restore: the end of a stream is reported to the engine only once the stream passed
every check. The first READ that finds the source's end checks the stored size and
SHA-256, and the logical ones behind decryption and decompression, against the
manifest (``ExpectedStream``) *before* completing with HANDLE_EOF; a failing check
completes that READ with a read fault instead. An engine that publishes its target only
after every device reported its end (every engine of vdistream does: the striping
engine's reassembly waits for each device's end) therefore never publishes a damaged
stream.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING, Protocol

import anyio

from vdistream.errors import (
    PipelineError,
    StorageError,
    StorageFullError,
    StorageIntegrityError,
    VDAbortError,
    VDClosedError,
)
from vdistream.pipeline import HashingSource
from vdistream.pipeline.chain import PipelineConfig, SinkChain, SourceChain
from vdistream.progress import DeviceProgress
from vdistream.protocol import Command, CommandCode, CommandResult, Completion, Fault, Whence
from vdistream.storage import Storage
from vdistream.throttle import Limits
from vdistream.vdi.contract import ClientDevice

if TYPE_CHECKING:  # structlog loads rich: 60 ms of every command's start-up
    import structlog

__all__ = ("ClientDevice", "DeviceJob", "DeviceOutcome", "ExpectedStream", "Pump", "PumpEnd")


class DeviceJob(Protocol):
    """The job a pump belongs to, as the pump sees it."""

    def device_ended(self) -> None:
        """A device's stream ended (``Pump.end`` is set): the job may decide now."""

    def device_failed(self, error: StorageError | PipelineError | None) -> None:
        """Abort the job: the device's storage failed (``error``), or the device found
        the set aborted (``None``: the set's own record says why)."""

    async def decision(self) -> bool:
        """Wait until the job decided; ``True`` when every sink may commit."""


class PumpEnd(enum.Enum):
    CLOSED = "closed"  # the engine closed the device: the normal end
    DISCARDED = "discarded"  # the engine sent DISCARD: it is abandoning the backup


@dataclasses.dataclass(frozen=True)
class ExpectedStream:
    """What a restore must read on one device: the stored stream, and the logical one
    when stages transform it."""

    stored_bytes: int
    stored_sha256: str
    logical_bytes: int | None = None
    logical_sha256: str | None = None


@dataclasses.dataclass(frozen=True)
class DeviceOutcome:
    """What one device did, once its pump ended.

    ``bytes`` and ``commands`` count what went through the pump (the logical stream);
    the digests are of the logical and the stored stream, for a backup once committed,
    for a restore once its end was read. ``error`` is the storage error that failed the
    device; ``left`` is the error of a sink abort that failed (what it wrote may remain).
    """

    end: PumpEnd | None
    bytes: int
    commands: int
    committed: bool = False
    sha256: str | None = None
    stored_bytes: int | None = None
    stored_sha256: str | None = None
    error: BaseException | None = None
    left: StorageError | None = None


_DATA = frozenset({CommandCode.READ, CommandCode.WRITE})


def _fault(code: CommandCode, error: Exception) -> int:
    """The completion a command fails with when its storage failed."""
    if isinstance(error, StorageFullError):
        return Completion.DISK_FULL
    return Fault.READ_FAULT if code is CommandCode.READ else Fault.WRITE_FAULT


@dataclasses.dataclass(eq=False, kw_only=True)
class Pump:
    """The owner of one device of a job, from opening its stream to its outcome."""

    device: ClientDevice
    progress: DeviceProgress
    job: DeviceJob
    index: int
    storage: Storage
    key: str
    backup: bool  # a sink to write (else a source to read)
    pipeline: PipelineConfig
    context: bytes
    limiter: anyio.CapacityLimiter
    log: structlog.stdlib.BoundLogger
    disk_like: bool = False
    drain_timeout: float = 10.0
    expected: ExpectedStream | None = None
    #: the bandwidth limits the job's devices share (none: ``Limits(())``)
    limits: Limits = dataclasses.field(default_factory=lambda: Limits(()))
    sink: SinkChain | None = dataclasses.field(default=None, init=False)
    source: SourceChain | None = dataclasses.field(default=None, init=False)
    position: int = dataclasses.field(default=0, init=False)
    end: PumpEnd | None = dataclasses.field(default=None, init=False)
    committed: bool = dataclasses.field(default=False, init=False)
    #: (logical SHA-256, stored bytes, stored SHA-256): a backup's once committed, a
    #: restore's once the stream's end was read and checked
    _digests: tuple[str | None, int | None, str | None] | None = dataclasses.field(
        default=None, init=False
    )
    _discarded: bool = dataclasses.field(default=False, init=False)
    _error: BaseException | None = dataclasses.field(default=None, init=False)
    _left: StorageError | None = dataclasses.field(default=None, init=False)

    def outcome(self) -> DeviceOutcome:
        """The device's outcome so far (final once ``run`` returned or was cancelled)."""
        p, digests = self.progress, self._digests or (None, None, None)
        return DeviceOutcome(
            self.end, p.bytes, p.commands, self.committed, *digests, self._error, self._left
        )

    async def run(self) -> DeviceOutcome:
        """Open, serve, await the job's decision, commit or abort. A failure of the set or
        the storage aborts the job (``DeviceJob.device_failed``) instead of raising."""
        try:
            await self._open()
            self.end = await self._serve()
            self.log.info("device_closed", end=self.end.value, bytes=self.progress.bytes)
            if self.source is not None:
                self._check_read(self.source)  # an engine that stopped reading early
            self.job.device_ended()
            if self.sink is not None and await self.job.decision():
                await self.sink.outer.commit()
                self.committed = True
                sink = self.sink
                self._digests = (sink.logical.sha256, sink.stored.size, sink.stored.sha256)
                self.log.info("sink_committed", bytes=sink.stored.size)
        except VDAbortError:
            self.job.device_failed(None)
        except (StorageError, PipelineError) as exc:
            if self.source is not None and not str(exc).startswith("device "):
                exc.args = (f"device {self.index}: {exc}",)  # which stream, in the user's terms
            self.log.error("storage_failed", error=str(exc))
            self._error = exc
            self.job.device_failed(exc)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.drain_timeout):
                await self._release()
        return self.outcome()

    async def _open(self) -> None:
        if self.backup:
            inner = await self.storage.open_sink(self.key, device=self.device.name)
            self.sink = SinkChain.build(
                inner, self.pipeline, context=self.context, limiter=self.limiter
            )
        else:
            self.source = SourceChain.build(
                await self.storage.open_source(self.key),
                self.pipeline,
                context=self.context,
                limiter=self.limiter,
            )

    async def _release(self) -> None:
        """Abort the sink unless it committed (nothing partial stays visible); close the
        source. Shielded and bounded by the caller."""
        if self.sink is not None and not self.committed:
            try:
                await self.sink.outer.abort()
                self.log.info("sink_aborted")
            except StorageError as exc:
                # What the store kept is reported once, as the job's error, and never
                # escapes the task group as an exception group.
                self.log.error("sink_abort_failed", error=str(exc))
                self._left = exc
                self.job.device_failed(exc)
        if self.source is not None:
            await self.source.outer.close()

    async def _serve(self) -> PumpEnd:
        """Serve commands until the engine closes the device; every command taken is
        completed here (or the set is aborted) before the next one is taken."""
        while True:
            try:
                command = await self.device.get_command(None)
            except VDClosedError:
                return PumpEnd.DISCARDED if self._discarded else PumpEnd.CLOSED
            failure: StorageError | PipelineError | None = None
            try:
                result = await self._execute(command)
            except (StorageError, PipelineError) as exc:  # a corrupt stream: the engine stops
                failure, result = exc, CommandResult(_fault(command.code, exc))
            self.device.complete_command(
                command, result.completion, result.bytes_transferred, result.position
            )
            if failure is not None:
                raise failure
            self.progress.commands += 1
            self.progress.bytes += result.bytes_transferred if command.code in _DATA else 0

    async def _execute(self, command: Command) -> CommandResult:
        code = command.code
        at = command.position if self.disk_like else None
        sink = self.sink.outer if self.sink is not None else None
        if code is CommandCode.WRITE and sink is not None:
            assert command.buffer is not None
            if self.limits.active:
                await self.limits.take(command.size)
            await sink.write(command.buffer, position=at)
            self.position = (self.position if at is None else at) + command.size
            return CommandResult(Completion.SUCCESS, command.size)
        if code is CommandCode.READ and self.source is not None:
            assert command.buffer is not None
            got = await self.source.outer.readinto(command.buffer, position=at)
            if self.limits.active:
                await self.limits.take(got)
            self.position = (self.position if at is None else at) + got
            if got == command.size:
                return CommandResult(Completion.SUCCESS, got)
            if self._digests is None:  # the first time the end is read
                self._check_read(self.source)  # raises: the READ fails instead of ending
            return CommandResult(Completion.HANDLE_EOF, got)
        if code in (CommandCode.FLUSH, CommandCode.COMPLETE):
            if sink is not None:
                await sink.flush()
            return CommandResult(Completion.SUCCESS)
        if code is CommandCode.CLEAR_ERROR:
            return CommandResult(Completion.SUCCESS)
        if code is CommandCode.DISCARD:
            self._discarded = True
            return CommandResult(Completion.SUCCESS)
        if self.disk_like and code is CommandCode.GET_POSITION:
            return CommandResult(Completion.SUCCESS, 0, self.position)
        if self.disk_like and code is CommandCode.SET_POSITION:
            return self._set_position(command)
        return CommandResult(Completion.NOT_SUPPORTED)

    def _set_position(self, command: Command) -> CommandResult:
        origin: int | None = None
        if command.size == Whence.BEGINNING:
            origin = 0
        elif command.size == Whence.CURRENT:
            origin = self.position
        elif command.size == Whence.END:
            origin = self.sink.outer.size if self.sink is not None else None
            if origin is None and self.source is not None:
                origin = self.source.outer.size
        if origin is None or origin + command.position < 0:
            return CommandResult(Completion.NOT_SUPPORTED, 0, self.position)
        self.position = origin + command.position
        return CommandResult(Completion.SUCCESS, 0, self.position)

    def _check_read(self, source: SourceChain) -> None:
        """Restore: the stream read must be the one the manifest describes. Called at the
        stream's end (before the engine hears of it) and again after the device closed
        (an engine that stopped reading early); ``url`` is the storage's own."""
        stored, logical = source.stored, source.logical
        self._digests = (logical.sha256, stored.bytes_read, stored.sha256)
        want = self.expected
        if want is None:
            return
        checks: list[tuple[str, HashingSource, int | None, str]] = [
            ("stored", stored, want.stored_bytes, want.stored_sha256)
        ]
        if want.logical_sha256 is not None:
            checks.append(("logical", logical, want.logical_bytes, want.logical_sha256))
        for what, hashed, size, sha256 in checks:
            if hashed.bytes_read != size or hashed.sha256 not in (None, sha256):
                raise StorageIntegrityError(
                    f"the {what} stream does not match the manifest: read {hashed.bytes_read} "
                    f"bytes with SHA-256 {hashed.sha256}, expected {size} bytes with "
                    f"SHA-256 {sha256}",
                    url=stored.url,
                )
