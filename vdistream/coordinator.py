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

Each device's life (its stage chain, its commands, its commit or abort) belongs to its
:class:`~vdistream.pump.Pump`, which reports a frozen ``DeviceOutcome``; the job folds
the outcomes into its ``DeviceResult``\\ s. A restore's target is published only after
every stream passed every check (see ``vdistream.pump``).

Bandwidth: a job has its own limit, ``job.throttle`` (a
:class:`~vdistream.throttle.RateLimit` of ``JobOptions.max_rate`` bytes per second,
``None``: none), which ``job.throttle.set_rate(n)`` changes while the job runs (within
a second: at once for a device already waiting). Its devices share it fairly (first
come, first served), together with ``JobOptions.limits`` and the limits a caller put in
effect with :func:`vdistream.throttle.sharing` when the job was created (a daemon's
global one). A device waiting on a limit counts as moving for the stall watchdog; an
abort lets every waiting device go at once.

A restore's errors are told in the user's terms: an engine's error names the device by
its index and the stored stream it read (the storage's actual location, not the set's
internal device names).

Sinks are published only after every device finished and the engine returned, so a
failure on one device never leaves another device's part of the backup visible. The
job's result says what happened, who aborted it and why, and carries the exception
that caused it (never an ExceptionGroup of internals).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import math
import time
import uuid
from collections.abc import AsyncIterator, Sequence

import anyio

from vdistream.engines import Engine, device_names
from vdistream.engines.base import EngineError
from vdistream.errors import (
    JobAbortedError,
    JobError,
    PipelineError,
    StorageError,
    VDAbortError,
    VDIError,
    VDOpenError,
    VDTimeoutError,
)
from vdistream.log import get_logger
from vdistream.pipeline.chain import PipelineConfig
from vdistream.pipeline.context import stream_context
from vdistream.progress import JobProgress
from vdistream.protocol import ClientState, Features, SetAbortCause, VDConfig
from vdistream.pump import DeviceOutcome, ExpectedStream, Pump, PumpEnd
from vdistream.storage import OrphanUploadsError, Storage, open_storage
from vdistream.throttle import Limits, RateLimit, shared_limits
from vdistream.vdi import Registry, SetStatistics

__all__ = (
    "Abort",
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
    "opened_storage",
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
class Abort:
    """Why a job aborted: the first cause, in words, and the exception behind it."""

    cause: AbortCause
    reason: str
    error: BaseException | None = None


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
    #: the job's bandwidth limit in bytes per second, shared by its devices (``None``:
    #: none); ``Job.throttle`` changes it while the job runs
    max_rate: int | None = None
    #: limits shared with other jobs that this job respects too (a daemon's global one)
    limits: tuple[RateLimit, ...] = ()


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
    #: the set's final configuration as the engine made it (``None``: never configured)
    configuration: VDConfig | None = None

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


@contextlib.asynccontextmanager
async def opened_storage(
    destination: str | Storage, *, close_within: float = 10.0
) -> AsyncIterator[Storage]:
    """The storage a URL names, closed afterwards (an S3 client holds connections;
    shielded, bounded by ``close_within`` seconds); a ``Storage`` given by the caller is
    the caller's to close. Inside ``storage.background()`` either way: the devices'
    sinks and sources keep their parallel calls (S3 parts) in the storage's group."""
    if isinstance(destination, Storage):
        async with destination.background():
            yield destination
        return
    storage = open_storage(destination)
    try:
        async with storage.background():
            yield storage
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(close_within):
            await storage.aclose()


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
    bytes and commands while it runs, ``job.statistics()`` the set's buffers and
    commands. Cancelling the task that runs it aborts the job cleanly and then lets the
    cancellation propagate.

    The set is named after the job (``vdistream-<backup id>-<random>``) unless the
    engine gives a name (``Engine.set_name``: an engine in another process opens the
    set by the name the user chose); the device names follow the set's.
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
        # the engine's hint first (an engine in another process opens the set by the
        # name the user gave it), else a name nobody else uses
        self.set_name = engine.set_name or f"vdistream-{self.backup_id}-{uuid.uuid4().hex[:8]}"
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
        self._hash_limiter = anyio.CapacityLimiter(max(2, count))
        #: the job's own bandwidth limit (module doc); ``set_rate`` changes it live
        self.throttle = RateLimit(self.options.max_rate, name="job")
        self._limits = Limits((self.throttle, *self.options.limits, *shared_limits()))
        self._storage_arg = storage
        self.storage: Storage | None = None
        self.status = JobStatus.PENDING
        self.progress = JobProgress()
        self.log = get_logger(__name__, job=self.backup_id, kind=kind.value)
        self._vds = engine.client_set(self.registry)
        self._abort_record: Abort | None = None
        self._scope: anyio.CancelScope | None = None
        self._pumps: list[Pump] = []
        #: the engine and every device: the job decides once none is left running
        self._running = count + 1
        self._engine_result: object = None
        self._configuration: VDConfig | None = None
        self._decided_event: anyio.Event | None = None  # made in run(): it needs a loop
        self._started = time.time()

    # --- lifecycle ---------------------------------------------------------------

    @property
    def _decided(self) -> anyio.Event:
        """Set once the job is decided: commit allowed (COMMITTING), or aborted."""
        assert self._decided_event is not None, "the job is not running"
        return self._decided_event

    def _move(self, to: JobStatus) -> None:
        if to not in _TRANSITIONS[self.status]:
            raise RuntimeError(f"job {self.backup_id}: {self.status.name} -> {to.name}")
        self.status = to

    @property
    def aborted(self) -> bool:
        return self._abort_record is not None

    @property
    def limits(self) -> tuple[RateLimit, ...]:
        """Every bandwidth limit the job's devices respect: its own first."""
        return self._limits.limits

    def statistics(self) -> SetStatistics | None:
        """The set's buffers in use and commands outstanding per device; ``None`` while
        the job has no set (before it starts, after it ended)."""
        return None if self._vds.state is ClientState.DNE else self._vds.statistics()

    def outcomes(self) -> tuple[DeviceOutcome, ...]:
        """What each device opened so far did, in device order."""
        return tuple(pump.outcome() for pump in self._pumps)

    def abort(
        self, reason: str = "requested by the user", *, cause: AbortCause = AbortCause.USER
    ) -> None:
        """Abort the job (its set, its pumps, its sinks); idempotent. ``cause`` is what
        the result's ``aborted_by`` says: ``USER`` or ``SHUTDOWN`` (a daemon stopping)."""
        self._abort(Abort(cause, reason))

    def _abort(self, why: Abort) -> None:
        first = self._abort_record
        if first is None and _being_cancelled():
            # Everything that fails while the caller's scope cancels us is a consequence.
            why = Abort(AbortCause.CANCELLED, "the job's caller cancelled it")
        if first is None:
            self._abort_record = why
            self.log.warning("abort_signalled", by=why.cause.value, reason=why.reason)
        elif why.error is not None and first.error is None and first.cause is why.cause:
            self._abort_record = dataclasses.replace(first, error=why.error)
        if self._vds.state not in (ClientState.DNE, ClientState.ABORTED):
            self._vds.signal_abort(why.reason)
        self._limits.release()  # no device waits for tokens to learn of the abort
        if self._decided_event is not None:
            self._decided_event.set()
        if self._scope is not None:
            drain = anyio.current_time() + self.options.drain_timeout
            self._scope.deadline = min(self._scope.deadline, drain)

    def _set_aborted(self) -> None:
        """The set aborted under us: its own record says who and why."""
        timeout = self._vds.aborted_by is SetAbortCause.SERVER_TIMEOUT
        cause = AbortCause.SERVER_TIMEOUT if timeout else AbortCause.ENGINE
        self._abort(Abort(cause, self._vds.abort_reason or "aborted"))

    # --- what the pumps ask (vdistream.pump.DeviceJob) -----------------------------------

    def device_failed(self, error: StorageError | PipelineError | None) -> None:
        if error is None:
            self._set_aborted()
        else:
            self._abort(Abort(AbortCause.SINK, str(error), error))

    async def decision(self) -> bool:
        await self._decided.wait()
        return self.status is JobStatus.COMMITTING and not self.aborted

    def device_ended(self) -> None:
        """A device ended, or the engine returned: the last of them decides the job."""
        self._running -= 1
        if self._running or self.aborted:
            return
        if any(pump.end is PumpEnd.DISCARDED for pump in self._pumps):
            self._abort(Abort(AbortCause.ENGINE, "the engine discarded the backup"))
            return
        self._move(JobStatus.COMMITTING)
        self._decided.set()

    # --- running -------------------------------------------------------------------

    async def run(self) -> JobResult:
        if self.status is not JobStatus.PENDING:
            raise RuntimeError(f"job {self.backup_id} was already run")
        self._move(JobStatus.RUNNING)
        if self.aborted:  # by an abort() made before run(): nothing started, nothing to undo
            return self._finish()
        self._decided_event = anyio.Event()
        self.log.info("job_started", set=self.set_name, devices=self.options.devices)
        try:
            async with opened_storage(
                self._storage_arg, close_within=self.options.drain_timeout
            ) as storage:
                self.storage = storage
                return await self._run()
        except StorageError as exc:
            if self.storage is not None:
                raise  # not the opening's: a bug inside the job, for the caller to see
            self._abort(Abort(AbortCause.SINK, str(exc), exc))
            return self._finish()

    async def _run(self) -> JobResult:
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
                self._abort(Abort(AbortCause.CANCELLED, "the job's caller cancelled it"))
            else:  # a bug of ours: still clean up, then let it propagate
                self._abort(Abort(AbortCause.ENGINE, f"internal error: {exc!r}", exc))
            with anyio.CancelScope(shield=True):
                await self._cleanup()
            self._finish()  # the record says aborted, even though the caller gets no result
            raise
        with anyio.CancelScope(shield=True):
            await self._cleanup()
        return self._finish()

    async def _drive(self, tg: anyio.abc.TaskGroup) -> None:
        try:
            # an engine that must first arrive (another process) may need longer
            waits = max(self.options.configuration_timeout, self.engine.configuration_wait or 0)
            config = await self._vds.get_configuration(waits)
        except VDTimeoutError:
            self._abort(
                Abort(
                    AbortCause.ENGINE,
                    f"the engine did not configure the set within {waits:g} s",
                )
            )
            return
        except VDAbortError:
            self._set_aborted()
            return
        wanted = Features.WRITE_MEDIA if self.kind is JobKind.BACKUP else Features.READ_MEDIA
        if not config.features & wanted:
            self._abort(
                Abort(
                    AbortCause.ENGINE,
                    f"the engine configured the set for the wrong direction "
                    f"(features 0x{config.features:x}, a {self.kind.value} needs {wanted.name})",
                )
            )
            return
        self._configuration = config
        assert self.storage is not None
        for index, name in enumerate(device_names(self.set_name, config.device_count)):
            device = self._vds.open_device(name)
            self.log.info("device_opened", device=device.name, index=index)
            pump = Pump(
                device=device,
                progress=self.progress.add_device(device.name),  # in device order
                job=self,
                index=index,
                storage=self.storage,
                key=self.keys[index],
                backup=self.kind is JobKind.BACKUP,
                pipeline=self.pipeline,
                context=stream_context(self.backup_id, index, len(self.keys)),
                limiter=self._hash_limiter,
                log=self.log.bind(device=device.name, key=self.keys[index]),
                disk_like=self.options.disk_like,
                drain_timeout=self.options.drain_timeout,
                expected=self.expected[index] if self.expected is not None else None,
                limits=self._limits,
            )
            self._pumps.append(pump)
            tg.start_soon(pump.run)

    async def _run_engine(self) -> None:
        try:
            self._engine_result = await self.engine.run(self.set_name, registry=self.registry)
        except (VDIError, JobError, StorageError, OSError) as exc:
            self._in_user_terms(exc)
            if self._abort_record is None:
                self._abort(Abort(AbortCause.ENGINE, f"the engine failed: {exc}", exc))
            elif self._abort_record.cause is AbortCause.ENGINE:
                self._abort(Abort(AbortCause.ENGINE, str(exc), exc))  # attach the engine's error
            return
        self.log.info("engine_finished")
        self.device_ended()

    def _in_user_terms(self, exc: BaseException) -> None:
        """Restate an engine error's place (the set's and device's internal names) as
        the device's index and the stream it reads or writes, in place: the user never
        saw those names (the job's logs still carry them, bound to every event)."""
        if not isinstance(exc, EngineError):
            return
        names = [pump.device.name for pump in self._pumps]
        where = None
        # longest first: device 1's name is the set's name followed by "1"
        for index, name in sorted(enumerate(names), key=lambda p: -len(p[1])):
            exc.detail = exc.detail.replace(f"device {name!r}", f"device {index}")
        if exc.device is not None and exc.device in names:
            index = names.index(exc.device)
            where = f"device {index}: {self._url(self.keys[index])}"
        exc.relocate(where)

    async def _watch_stall(self) -> None:
        timeout = self.options.stall_timeout
        if timeout <= 0 or math.isinf(timeout):
            return
        last, since = self.progress.moved(), anyio.current_time()
        while not self._decided.is_set():
            with anyio.move_on_after(min(1.0, timeout / 4)):
                await self._decided.wait()
            moved = self.progress.moved()
            if self.engine.busy or self._only_engine_left() or self._limits.waiting:
                # silent work the engine vouches for (a snapshot, ...), its end after
                # every device closed (SQL Server's history, a restore's recovery), or
                # a device held back by a bandwidth limit (bounded: it moves at its rate)
                since = anyio.current_time()
            if moved != last:
                last, since = moved, anyio.current_time()
            elif anyio.current_time() - since >= timeout and not self._decided.is_set():
                self._abort(
                    Abort(
                        AbortCause.WATCHDOG,
                        f"stalled: no device moved a byte or a command for {timeout:g} s",
                    )
                )

    def _only_engine_left(self) -> bool:
        """Every device ended and the engine still runs: nothing more moves on a device,
        so no byte counts as progress; the engine's own bounds apply."""
        return len(self._pumps) == self.options.devices and all(
            pump.end is not None for pump in self._pumps
        )

    async def _cleanup(self) -> None:
        """After every task ended: undo published parts of a failed job, close the set."""
        if self.aborted and self.storage is not None:
            with anyio.move_on_after(self.options.drain_timeout):
                for pump in self._pumps:
                    if pump.committed:
                        try:
                            await self.storage.delete(pump.key)
                        except StorageError as exc:
                            self.log.error("cleanup_failed", key=pump.key, error=str(exc))
        if self._vds.state is not ClientState.DNE:
            if not self.aborted and self._vds.state is not ClientState.NORMALLY_TERMINATED:
                self._abort(
                    Abort(AbortCause.ENGINE, "the engine ended without closing every device")
                )
            try:
                self._vds.close()
            except VDOpenError:
                pass

    def _finish(self) -> JobResult:
        self.progress.finished = True
        devices = tuple(
            DeviceResult(
                name=pump.device.name,
                key=pump.key,
                url=self._url(pump.key),
                bytes=outcome.bytes,
                commands=outcome.commands,
                sha256=outcome.sha256,
                stored_bytes=outcome.stored_bytes,
                stored_sha256=outcome.stored_sha256,
            )
            for pump, outcome in zip(self._pumps, self.outcomes(), strict=True)
        )
        why = self._abort_record
        status, reason, error = JobStatus.SUCCEEDED, None, None
        if why is not None:
            status = JobStatus.ABORTED if why.cause in _ABORTED_BY else JobStatus.FAILED
            reason, error = why.reason, why.error
            if error is None:
                error = JobAbortedError(
                    f"{self.kind.value} {self.backup_id} aborted: {reason}", by=why.cause.value
                )
            orphans = [o.left for o in self.outcomes() if isinstance(o.left, OrphanUploadsError)]
            if orphans:
                # What is left matters more than why: one line naming it and its remedy.
                left = OrphanUploadsError.merge(orphans)
                if error not in orphans:
                    left.args = (f"{left}; the job failed first: {error}",)
                left.__cause__ = error
                error, reason = left, str(left)
            self.log.warning("job_finished", status=status.value, by=why.cause.value, reason=reason)
        self._move(status)
        result = JobResult(
            self.kind,
            status,
            self.backup_id,
            self.set_name,
            devices,
            self._started,
            time.time(),
            aborted_by=why.cause if why is not None else None,
            reason=reason,
            error=error,
            engine_result=self._engine_result,
            configuration=self._configuration,
        )
        if result.ok:
            self.log.info("job_finished", status="succeeded", bytes=result.bytes)
        return result

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
