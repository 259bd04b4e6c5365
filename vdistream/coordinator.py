"""The job: one client set, one engine, one pump task per device, one way to abort.

A backup job creates the client side of a set, starts the engine (the server side)
in the same task group, waits for the engine's configuration, opens every device and
runs one :class:`~vdistream.pump.Pump` per device. It succeeds when every device was
closed normally by the engine, the engine returned, and every sink committed.

Abort is one path for every cause (``AbortCause``): the user's ``Job.abort()``, a
sink error, an engine failure or abort, the stall watchdog, the VDI server-timeout
watchdog, or the caller cancelling the job. Each ends in :meth:`Job._abort`, which

1. records the first cause (later ones are consequences),
2. calls ``signal_abort()`` on the set, so every waiting VDI call wakes and the
   engine stops sending,
3. moves the task group's deadline to now + ``drain_timeout``: each pump finishes
   the I/O on the buffer it holds (sink writes are shielded), finds its completion
   refused with ``VDAbortError`` and stops; a pump still stuck when the deadline
   passes is cancelled,
4. lets every pump abort its sink (shielded, bounded by ``drain_timeout``), so
   nothing partial stays visible, and deletes objects already committed,
5. and only then ``close()``\\ s the set.

A restore's target is published only after every stream passed every check: each pump
checks its stream (stored size and SHA-256, and the logical ones behind decryption and
decompression, whose authentication tags are checked while reading) the moment it reads
the stream's end, *before* it tells the engine that the stream ended; a stream that
fails completes that READ with a read fault, so the engine, which publishes only after
every device reported its end, discards its target instead (``Pump(at_end=...)``).

A restore's errors are told in the user's terms: an engine's error names the device by
its index and the stored stream it read (the storage's actual location, not the set's
internal device names).

Sinks are published only after every device finished: a device's COMPLETE or FLUSH
makes its stream durable, but the commit (rename into place) waits until the whole
set is known good, so a failure on one device never leaves another device's part of
the backup visible. The job's result says what happened, who aborted it and why,
and carries the exception that caused it (never an ExceptionGroup of internals).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import time
import uuid
from collections.abc import Sequence

import anyio

from vdistream.engines import Engine
from vdistream.engines.base import EngineError
from vdistream.errors import (
    JobAbortedError,
    JobError,
    PipelineError,
    StorageError,
    StorageIntegrityError,
    VDAbortError,
    VDIError,
    VDOpenError,
    VDProtocolError,
    VDTimeoutError,
)
from vdistream.log import get_logger
from vdistream.pipeline import HashingSource
from vdistream.pipeline.chain import PipelineConfig, SinkChain, SourceChain
from vdistream.pipeline.encrypt import stream_context
from vdistream.progress import DeviceProgress, JobProgress
from vdistream.protocol import Features, VDConfig
from vdistream.pump import Pump, PumpEnd
from vdistream.storage import OrphanUploadsError, Storage, open_storage
from vdistream.vdi import ClientVirtualDevice, ClientVirtualDeviceSet, Registry

__all__ = (
    "AbortCause",
    "DeviceResult",
    "ExpectedStream",
    "Job",
    "JobKind",
    "JobOptions",
    "JobResult",
    "JobStatus",
    "backup",
    "new_backup_id",
    "restore",
    "stream_key",
)


def _being_cancelled() -> bool:
    """Whether the calling task is inside a cancelled scope (the caller cancelled the job).

    A job's own abort only moves its task group's deadline into the future (the drain),
    so an effective deadline of minus infinity can only come from a real cancellation.
    """
    try:
        return anyio.current_effective_deadline() == -math.inf
    except RuntimeError:  # not in an event loop: cannot be
        return False


class JobKind(enum.Enum):
    BACKUP = "backup"
    RESTORE = "restore"


class JobStatus(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    COMMITTING = "committing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ABORTED = "aborted"


_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.PENDING: frozenset({JobStatus.RUNNING, JobStatus.FAILED, JobStatus.ABORTED}),
    JobStatus.RUNNING: frozenset({JobStatus.COMMITTING, JobStatus.FAILED, JobStatus.ABORTED}),
    JobStatus.COMMITTING: frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.ABORTED}),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.ABORTED: frozenset(),
}


class AbortCause(enum.Enum):
    USER = "user"  # Job.abort()
    CANCELLED = "cancelled"  # the caller's scope was cancelled
    ENGINE = "engine"  # the engine failed, aborted or abandoned the backup
    SINK = "sink"  # storage failed, or a stored stream failed to decode or authenticate
    WATCHDOG = "watchdog"  # no device moved a byte for stall_timeout
    SERVER_TIMEOUT = "server-timeout"  # the VDI set's own server-timeout watchdog
    SHUTDOWN = "shutdown"  # Job.abort(cause=SHUTDOWN): the service running it is stopping


#: Causes that end a job ``ABORTED``; the others (a failure) end it ``FAILED``.
_ABORTED_BY = frozenset(
    {AbortCause.USER, AbortCause.SHUTDOWN, AbortCause.CANCELLED, AbortCause.WATCHDOG}
)


@dataclasses.dataclass(frozen=True)
class JobOptions:
    """How a job runs. Timeouts are seconds."""

    devices: int = 4
    disk_like: bool = False
    #: Ask the engine for VDC_Complete at the end of a backup (KB3188454).
    request_complete: bool = True
    configuration_timeout: float = 30.0
    drain_timeout: float = 10.0
    stall_timeout: float = 60.0
    #: VDConfig.server_timeout_ms: the set aborts itself when commands stay pending.
    server_timeout_ms: int = 0
    #: How long one get_command waits before the pump checks again.
    poll: float = 1.0


@dataclasses.dataclass(frozen=True)
class DeviceResult:
    """One device of a finished job, with the SHA-256 of its logical and stored streams
    (backup: once committed; restore: as read)."""

    name: str
    key: str
    url: str
    bytes: int  # through the pump: what the engine wrote or read (the logical stream)
    commands: int
    sha256: str | None = None  # of the logical stream
    stored_bytes: int | None = None  # what the medium holds (after compression, encryption)
    stored_sha256: str | None = None


@dataclasses.dataclass(frozen=True)
class JobResult:
    kind: JobKind
    status: JobStatus
    backup_id: str
    set_name: str
    devices: tuple[DeviceResult, ...]
    started: float  # wall-clock seconds since the epoch
    ended: float
    aborted_by: AbortCause | None = None
    reason: str | None = None
    error: BaseException | None = None
    engine_result: object = None

    @property
    def ok(self) -> bool:
        return self.status is JobStatus.SUCCEEDED

    @property
    def bytes(self) -> int:
        return sum(d.bytes for d in self.devices)

    @property
    def duration(self) -> float:
        return self.ended - self.started

    def raise_for_status(self) -> JobResult:
        if not self.ok:
            assert self.error is not None
            raise self.error
        return self


@dataclasses.dataclass(frozen=True)
class ExpectedStream:
    """What a restore must read on one device: the stored stream, and the logical one
    when stages transform it."""

    stored_bytes: int
    stored_sha256: str
    logical_bytes: int | None = None
    logical_sha256: str | None = None


def new_backup_id() -> str:
    """A fresh backup id: the UTC time and a random suffix (``20250101T120000Z-1a2b3c4d``)."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


def stream_key(backup_id: str, index: int, count: int) -> str:
    """Where device ``index`` of ``count`` stores its stream, inside the destination."""
    return f"{backup_id}/stream-{index:02d}-of-{count:02d}.vdi"


class Job:
    """One backup or restore through a virtual device set.

    Create it, ``await job.run()`` for the :class:`JobResult`; ``job.abort()`` from
    another task on the same event loop aborts it; ``job.progress`` reports per-device
    bytes and commands while it runs. Cancelling the task that runs it aborts the job
    cleanly and then lets the cancellation propagate.
    """

    def __init__(
        self,
        kind: JobKind,
        engine: Engine,
        storage: str | Storage,
        *,
        backup_id: str | None = None,
        options: JobOptions | None = None,
        registry: Registry | None = None,
        keys: Sequence[str] | None = None,
        expected: Sequence[ExpectedStream] | None = None,
        pipeline: PipelineConfig | None = None,
    ) -> None:
        self.kind = kind
        self.engine = engine
        self.options = options or JobOptions()
        self.backup_id = backup_id or new_backup_id()
        self.set_name = f"vdistream-{self.backup_id}-{uuid.uuid4().hex[:8]}"
        self.registry = registry if registry is not None else Registry()
        count = self.options.devices
        self.keys = (
            list(keys)
            if keys is not None
            else [stream_key(self.backup_id, i, count) for i in range(count)]
        )
        if len(self.keys) != count:
            raise ValueError(f"{len(self.keys)} keys for {count} devices")
        #: restore: what each stored (and logical) stream must be, from the manifest
        self.expected = list(expected) if expected is not None else None
        self.pipeline = pipeline or PipelineConfig()
        if self.pipeline.any and self.options.disk_like:
            raise ValueError("compression and encryption need pipe-like (sequential) devices")
        self._hashes: dict[int, tuple[str | None, int | None, str | None]] = {}
        self._hash_limiter = anyio.CapacityLimiter(max(2, count))
        self._storage_arg = storage
        self.storage: Storage | None = None
        self.status = JobStatus.PENDING
        self.progress = JobProgress()
        self.log = get_logger(__name__, job=self.backup_id, kind=kind.value)
        self._vds = ClientVirtualDeviceSet(registry=self.registry)
        self._cause: tuple[AbortCause, str, BaseException | None] | None = None
        #: sinks whose abort failed: what they wrote may still be in the storage
        self._left: list[StorageError] = []
        self._scope: anyio.CancelScope | None = None
        self._closed_devices = 0
        self._ends: dict[int, PumpEnd] = {}
        self._engine_done = False
        self._engine_result: object = None
        self._ready_to_commit = False
        self._decided_event: anyio.Event | None = None  # made in run(): it needs a loop
        self._device_names: list[str] = []
        self._committed: list[str] = []
        self._started = time.time()

    # --- lifecycle ---------------------------------------------------------------

    @property
    def _decided(self) -> anyio.Event:
        """Set once the job is decided: commit allowed, or aborted."""
        assert self._decided_event is not None, "the job is not running"
        return self._decided_event

    def _move(self, to: JobStatus) -> None:
        if to not in _TRANSITIONS[self.status]:
            raise RuntimeError(f"job {self.backup_id}: {self.status.name} -> {to.name}")
        self.status = to

    @property
    def aborted(self) -> bool:
        return self._cause is not None

    def abort(
        self, reason: str = "requested by the user", *, cause: AbortCause = AbortCause.USER
    ) -> None:
        """Abort the job (its set, its pumps, its sinks); idempotent. ``cause`` is what
        the result's ``aborted_by`` says: ``USER`` or ``SHUTDOWN`` (a daemon stopping)."""
        self._abort(cause, reason, None)

    def _abort(self, by: AbortCause, reason: str, error: BaseException | None) -> None:
        if self._cause is None and _being_cancelled():
            # Everything that fails while the caller's scope cancels us is a consequence.
            by, reason, error = AbortCause.CANCELLED, "the job's caller cancelled it", None
        if self._cause is None:
            self._cause = (by, reason, error)
            self.log.warning("abort_signalled", by=by.value, reason=reason)
        elif error is not None and self._cause[2] is None and self._cause[0] is by:
            self._cause = (by, self._cause[1], error)
        if self._vds.state.name not in ("DNE", "ABORTED"):
            try:
                self._vds.signal_abort()
            except VDProtocolError:
                pass
        if self._decided_event is not None:
            self._decided_event.set()
        if self._scope is not None:
            drain = anyio.current_time() + self.options.drain_timeout
            self._scope.deadline = min(self._scope.deadline, drain)

    # --- running -------------------------------------------------------------------

    async def run(self) -> JobResult:
        if self.status is not JobStatus.PENDING:
            raise RuntimeError(f"job {self.backup_id} was already run")
        self._move(JobStatus.RUNNING)
        self._decided_event = anyio.Event()
        self.log.info("job_started", set=self.set_name, devices=self.options.devices)
        try:
            self.storage = (
                self._storage_arg
                if isinstance(self._storage_arg, Storage)
                else open_storage(self._storage_arg)
            )
        except StorageError as exc:
            self._abort(AbortCause.SINK, str(exc), exc)
            return self._finish()
        features = Features.LIKE_DISK if self.options.disk_like else Features.LIKE_PIPE
        if self.kind is JobKind.BACKUP and self.options.request_complete:
            features |= Features.REQUEST_COMPLETE
        self._vds.create(
            self.set_name,
            VDConfig(
                device_count=self.options.devices,
                features=features,
                server_timeout_ms=self.options.server_timeout_ms,
            ),
        )
        try:
            async with anyio.create_task_group() as tg:
                self._scope = tg.cancel_scope
                tg.start_soon(self._run_engine)
                tg.start_soon(self._watch_stall)
                await self._drive(tg)
        except BaseException as exc:
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                self._abort(AbortCause.CANCELLED, "the job's caller cancelled it", None)
            else:  # a bug of ours: still clean up, then let it propagate
                self._abort(AbortCause.ENGINE, f"internal error: {exc!r}", exc)
            with anyio.CancelScope(shield=True):
                await self._cleanup()
            self._finish()  # the record says aborted, even though the caller gets no result
            raise
        with anyio.CancelScope(shield=True):
            await self._cleanup()
        return self._finish()

    async def _drive(self, tg: anyio.abc.TaskGroup) -> None:
        try:
            config = await self._vds.get_configuration(self.options.configuration_timeout)
        except VDTimeoutError:
            self._abort(
                AbortCause.ENGINE,
                f"the engine did not configure the set within "
                f"{self.options.configuration_timeout:g} s",
                None,
            )
            return
        except VDAbortError as exc:
            self._abort(self._cause_of_set_abort(), self._vds.abort_reason or str(exc), None)
            return
        wanted = Features.WRITE_MEDIA if self.kind is JobKind.BACKUP else Features.READ_MEDIA
        if not config.features & wanted:
            self._abort(
                AbortCause.ENGINE,
                f"the engine configured the set for the wrong direction "
                f"(features 0x{config.features:x}, a {self.kind.value} needs {wanted.name})",
                None,
            )
            return
        names = [self.set_name] + [f"{self.set_name}{i}" for i in range(1, config.device_count)]
        self._device_names = names
        devices = [self._vds.open_device(name) for name in names]
        for index, device in enumerate(devices):
            self.log.info("device_opened", device=device.name, index=index)
            progress = self.progress.add_device(device.name)  # in device order
            tg.start_soon(self._pump, index, device, progress)

    def _cause_of_set_abort(self) -> AbortCause:
        reason = self._vds.abort_reason or ""
        return AbortCause.SERVER_TIMEOUT if "server timeout" in reason else AbortCause.ENGINE

    async def _run_engine(self) -> None:
        try:
            self._engine_result = await self.engine.run(self.set_name, registry=self.registry)
        except (VDIError, JobError, StorageError, OSError) as exc:
            self._in_user_terms(exc)
            if self.aborted:
                if self._cause is not None and self._cause[0] is AbortCause.ENGINE:
                    self._abort(AbortCause.ENGINE, str(exc), exc)  # attach the engine's error
                return
            self._abort(AbortCause.ENGINE, f"the engine failed: {exc}", exc)
            return
        self.log.info("engine_finished")
        self._engine_done = True
        self._maybe_commit()

    def _in_user_terms(self, exc: BaseException) -> None:
        """Restate an engine error's place (the set's and device's internal names) as
        the device's index and the stream it reads or writes, in place: the user never
        saw those names (the job's logs still carry them, bound to every event)."""
        if not isinstance(exc, EngineError):
            return
        where = None
        # longest first: device 1's name is the set's name followed by "1"
        for index, name in sorted(enumerate(self._device_names), key=lambda p: -len(p[1])):
            exc.detail = exc.detail.replace(f"device {name!r}", f"device {index}")
        if exc.device is not None and exc.device in self._device_names:
            index = self._device_names.index(exc.device)
            where = f"device {index}: {self._url(self.keys[index])}"
        exc.relocate(where)

    def _maybe_commit(self) -> None:
        if not self.aborted and self._engine_done and len(self._ends) == len(self.keys):
            if any(end is PumpEnd.DISCARDED for end in self._ends.values()):
                self._abort(AbortCause.ENGINE, "the engine discarded the backup", None)
                return
            self._ready_to_commit = True
            self._move(JobStatus.COMMITTING)
            self._decided.set()

    async def _watch_stall(self) -> None:
        timeout = self.options.stall_timeout
        if timeout <= 0 or math.isinf(timeout):
            return
        last, since = self.progress.moved(), anyio.current_time()
        while not self._decided.is_set():
            with anyio.move_on_after(min(1.0, timeout / 4)):
                await self._decided.wait()
            moved = self.progress.moved()
            if self.engine.busy:  # silent work the engine vouches for (a snapshot, ...)
                since = anyio.current_time()
            if moved != last:
                last, since = moved, anyio.current_time()
            elif anyio.current_time() - since >= timeout and not self._decided.is_set():
                self._abort(
                    AbortCause.WATCHDOG,
                    f"stalled: no device moved a byte or a command for {timeout:g} s",
                    None,
                )

    async def _pump(
        self, index: int, device: ClientVirtualDevice, progress: DeviceProgress
    ) -> None:
        assert self.storage is not None
        key = self.keys[index]
        log = self.log.bind(device=device.name, key=key)
        sink: SinkChain | None = None
        source: SourceChain | None = None
        committed = False
        context = stream_context(self.backup_id, index, len(self.keys))
        try:
            try:
                if self.kind is JobKind.BACKUP:
                    sink = SinkChain.build(
                        await self.storage.open_sink(key, device=device.name),
                        self.pipeline,
                        context=context,
                        limiter=self._hash_limiter,
                    )
                else:
                    source = SourceChain.build(
                        await self.storage.open_source(key),
                        self.pipeline,
                        context=context,
                        limiter=self._hash_limiter,
                    )
                read = source
                pump = Pump(
                    device,
                    progress,
                    sink=sink.outer if sink is not None else None,
                    source=source.outer if source is not None else None,
                    disk_like=self.options.disk_like,
                    poll=self.options.poll,
                    at_end=(lambda: self._check_read(index, read)) if read is not None else None,
                )
                end = await pump.run()
                log.info("device_closed", end=end.value, bytes=progress.bytes)
                if source is not None:
                    self._check_read(index, source)
                self._ends[index] = end
                self._maybe_commit()
                if sink is not None:
                    await self._decided.wait()
                    if self._ready_to_commit and not self.aborted:
                        await sink.outer.commit()
                        committed = True
                        self._committed.append(key)
                        self._hashes[index] = (
                            sink.logical.sha256,
                            sink.stored.size,
                            sink.stored.sha256,
                        )
                        log.info("sink_committed", bytes=sink.stored.size)
            except VDAbortError:
                self._abort(self._cause_of_set_abort(), self._vds.abort_reason or "aborted", None)
            except (StorageError, PipelineError) as exc:
                if source is not None and not str(exc).startswith("device "):
                    exc.args = (f"device {index}: {exc}",)  # which stream, in the user's terms
                log.error("storage_failed", error=str(exc))
                self._abort(AbortCause.SINK, str(exc), exc)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.options.drain_timeout):
                if sink is not None and not committed:
                    try:
                        await sink.outer.abort()
                        log.info("sink_aborted")
                    except StorageError as exc:
                        # What the store kept is reported once, as the job's error, and
                        # never escapes the task group as an exception group.
                        log.error("sink_abort_failed", error=str(exc))
                        self._abort(AbortCause.SINK, str(exc), exc)
                        self._left.append(exc)
                if source is not None:
                    await source.outer.close()

    def _check_read(self, index: int, source: SourceChain) -> None:
        """Restore: the streams read must be the ones the manifest describes. Called at
        the stream's end (before the engine hears of it) and again after the device
        closed (an engine that stopped reading early); ``url`` is the storage's own."""
        stored, logical = source.stored, source.logical
        self._hashes[index] = (logical.sha256, stored.bytes_read, stored.sha256)
        if self.expected is None:
            return
        want = self.expected[index]
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

    async def _cleanup(self) -> None:
        """After every task ended: undo published parts of a failed job, close the set."""
        if self.aborted and self._committed and self.storage is not None:
            with anyio.move_on_after(self.options.drain_timeout):
                for key in list(self._committed):
                    try:
                        await self.storage.delete(key)
                        self._committed.remove(key)
                    except StorageError as exc:
                        self.log.error("cleanup_failed", key=key, error=str(exc))
        if self.storage is not None and self.storage is not self._storage_arg:
            with anyio.move_on_after(self.options.drain_timeout):
                await self.storage.aclose()  # we opened it from a URL: ours to close
        if self._vds.state.name != "DNE":
            if not self.aborted and self._vds.state.name != "NORMALLY_TERMINATED":
                self._abort(
                    AbortCause.ENGINE, "the engine ended without closing every device", None
                )
            try:
                self._vds.close()
            except VDOpenError:
                pass

    def _finish(self) -> JobResult:
        assert self.storage is not None or self._cause is not None
        self.progress.finished = True
        devices = tuple(
            DeviceResult(
                name=p.name,
                key=self.keys[i],
                url=self._url(self.keys[i]),
                bytes=p.bytes,
                commands=p.commands,
                sha256=self._hashes.get(i, (None, None, None))[0],
                stored_bytes=self._hashes.get(i, (None, None, None))[1],
                stored_sha256=self._hashes.get(i, (None, None, None))[2],
            )
            for i, p in enumerate(self.progress.devices)
        )
        if self._cause is None:
            self._move(JobStatus.SUCCEEDED)
            result = JobResult(
                self.kind,
                self.status,
                self.backup_id,
                self.set_name,
                devices,
                self._started,
                time.time(),
                engine_result=self._engine_result,
            )
            self.log.info("job_finished", status="succeeded", bytes=result.bytes)
            return result
        by, reason, error = self._cause
        if error is None:
            error = JobAbortedError(
                f"{self.kind.value} {self.backup_id} aborted: {reason}", by=by.value
            )
        orphans = [e for e in self._left if isinstance(e, OrphanUploadsError)]
        if orphans:
            # What is left matters more than why: one line naming it and its remedy.
            left = OrphanUploadsError.merge(orphans)
            if error not in orphans:
                left.args = (f"{left}; the job failed first: {error}",)
            left.__cause__ = error
            error, reason = left, str(left)
        status = JobStatus.ABORTED if by in _ABORTED_BY else JobStatus.FAILED
        self._move(status)
        self.log.warning("job_finished", status=status.value, by=by.value, reason=reason)
        return JobResult(
            self.kind,
            status,
            self.backup_id,
            self.set_name,
            devices,
            self._started,
            time.time(),
            aborted_by=by,
            reason=reason,
            error=error,
            engine_result=self._engine_result,
        )

    def _url(self, key: str) -> str:
        base = self.storage.url if self.storage is not None else str(self._storage_arg)
        return f"{base.rstrip('/')}/{key}"


async def backup(
    engine: Engine,
    destination: str | Storage,
    *,
    backup_id: str | None = None,
    options: JobOptions | None = None,
    registry: Registry | None = None,
) -> JobResult:
    """Run one backup job to the end and return its result."""
    job = Job(
        JobKind.BACKUP, engine, destination, backup_id=backup_id, options=options, registry=registry
    )
    return await job.run()


async def restore(
    engine: Engine,
    source: str | Storage,
    backup_id: str,
    *,
    options: JobOptions | None = None,
    registry: Registry | None = None,
) -> JobResult:
    """Run one restore job (feeding the stored streams to ``engine``) and return its result."""
    job = Job(
        JobKind.RESTORE, engine, source, backup_id=backup_id, options=options, registry=registry
    )
    return await job.run()
