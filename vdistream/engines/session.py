"""``ServerSession``: the parts of ``Engine.run`` every engine shares.

An engine writes only what is particular to it (its configuration choices and its
command sequence); the session does the rest of the engine contract of
``vdistream.engines.base``:

* ``run(body)`` opens the set by name, awaits ``body(session)`` and closes the set; on
  any failure it signals abort, closes the set and raises one ``EngineError`` (the
  first failure, translated), or lets a cancellation propagate after the same cleanup.
* the set is ``registry.server_set()`` (``vdistream.vdi.contract.ServerSet``): the
  in-process ``ServerVirtualDeviceSet`` of the default registry, or, with a
  ``vdistream.transport.engine.RemoteRegistry``, the engine's side of a set another
  process serves. The session works over either: the calls that may wait for the
  other process are awaited through ``settle``, so ``configure``, ``open_devices``,
  ``close_devices``, ``close`` and ``abort_and_close`` are coroutines; ``run`` holds the
  set's ``async with`` (a remote set's reader task) around the whole job.
* configuration, device opening (``device_names``), buffer allocation and command
  sending with the VDI errors translated into engine errors that name the device;
* ``result``/``expect`` wait for a command's completion (bounded by
  ``command_timeout``) and turn ``OPERATION_ABORTED`` into ``EngineAbortedError`` and a
  failure code into ``CommandFailedError``. After such a completion the engine must not
  touch that command's buffer again; the session never frees it.
* per-device statistics (``stats()``); ``fault(phase)`` marks the fail points of
  ``vdistream.engines.faults`` and does nothing here: an engine given a ``FailPoint``
  runs a ``FaultySession`` instead, chosen once, so the hot path checks no fault.
* ``task_group()``: a task group whose first failing task decides the error ``run``
  raises, so that the secondary failures it causes (other devices seeing the abort)
  never hide the cause.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from vdistream.engines.base import (
    CommandFailedError,
    DeviceStats,
    EngineAbortedError,
    EngineError,
    device_names,
    freeze_counts,
)
from vdistream.errors import VDAbortError, VDIError, VDTimeoutError
from vdistream.log import get_logger
from vdistream.protocol import (
    CommandCode,
    CommandResult,
    Completion,
    ServerState,
    VDConfig,
    Whence,
)
from vdistream.vdi import Registry, default_registry
from vdistream.vdi.contract import PendingResult, ServerDevice, ServerSet, settle

if TYPE_CHECKING:
    from vdistream.engines.faults import Phase

__all__ = ("DeviceQueue", "PendingWrite", "ServerSession", "TaskSpawner", "device_queues")

T = TypeVar("T")

DATA_COMMANDS = (CommandCode.READ, CommandCode.WRITE)

_log = get_logger(__name__)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


#: One device's queue: its two ends.
DeviceQueue = tuple[MemoryObjectSendStream[T], MemoryObjectReceiveStream[T]]


def device_queues(
    stack: contextlib.ExitStack, n: int, item: type[T] | None = None
) -> list[DeviceQueue[T]]:
    """One queue per device, closed with ``stack``. Unbounded: what they hold are set
    buffers (or pieces of them), which BUFFERCOUNT bounds already. ``item`` only names
    the type of what they carry."""
    queues: list[DeviceQueue[T]] = [anyio.create_memory_object_stream(math.inf) for _ in range(n)]
    for send, receive in queues:
        stack.enter_context(send)
        stack.enter_context(receive)
    return queues


@dataclasses.dataclass(slots=True)
class PendingWrite:
    """A WRITE that was sent, and the whole allocated buffer to free once it completed
    (``ServerSession.await_writes``)."""

    pending: PendingResult
    buffer: memoryview


class TaskSpawner:
    """``start_soon`` for ``ServerSession.task_group``: records the first failure."""

    def __init__(self, session: ServerSession, group: anyio.abc.TaskGroup) -> None:
        self._session = session
        self._group = group

    def start_soon(
        self, func: Callable[..., Coroutine[Any, Any, object]], *args: object, name: str
    ) -> None:
        session = self._session

        async def guarded() -> None:
            try:
                await func(*args)
            except Exception as exc:
                session.record_failure(exc)
                raise

        self._group.start_soon(guarded, name=name)


class ServerSession:
    """The server side of one set during one ``Engine.run`` (module docstring)."""

    def __init__(
        self,
        set_name: str,
        *,
        registry: Registry | None = None,
        open_timeout: float | None = 60.0,
        command_timeout: float | None = None,
    ) -> None:
        self.set_name = set_name
        self.sds: ServerSet = (registry if registry is not None else default_registry).server_set()
        self.open_timeout = open_timeout
        self.command_timeout = command_timeout
        self.devices: list[ServerDevice] = []
        self.device_count = 0
        self.counts: list[Counter[CommandCode]] = []
        self.bytes: list[int] = []
        self.first_failure: Exception | None = None
        #: Per device, read buffers whose data the engine has not used up yet (restore).
        self.lent: list[int] = []
        self._inflight: list[set[PendingResult]] = []
        self.log = _log.bind(set_name=set_name)

    # --- the whole run -----------------------------------------------------------

    async def run(self, body: Callable[[ServerSession], Awaitable[T]]) -> T:
        """Open the set, await ``body(self)``, close the set (see the module docstring)."""
        try:
            async with self.sds:
                await self._open()
                result = await body(self)
                await self.close()
        except BaseException as exc:
            failure = await self._fail(exc)
            if failure is None:
                raise  # cancellation or KeyboardInterrupt: propagate it unchanged
            error, primary = failure
            if error is exc:
                raise
            if error is primary:  # an EngineError out of a task group: keep its own cause
                raise error from error.__cause__
            raise error from primary
        return result

    async def _open(self) -> None:
        with self.vdi_calls("cannot open the set", aborted=False):
            await settle(self.sds.open(None, self.set_name))
            config = self.sds.get_configuration()
        self.device_count = config.device_count
        self.counts = [Counter() for _ in range(config.device_count)]
        self.bytes = [0] * config.device_count
        self._inflight = [set() for _ in range(config.device_count)]
        self.lent = [0] * config.device_count
        self.log.debug("engine_opened", devices=config.device_count)

    async def _fail(self, exc: BaseException) -> tuple[EngineError, Exception] | None:
        """Abort and close the set (leaving ``async with`` did, unless the failure came
        from there); the error ``run`` raises and the failure it stands for (None:
        re-raise ``exc``)."""
        await self.abort_and_close()
        errors = [leaf for leaf in _leaves(exc) if isinstance(leaf, Exception)]
        if not errors:
            self.log.info("engine_cancelled")
            return None
        first = self.first_failure
        primary = first if first is not None and any(e is first for e in errors) else errors[0]
        error = self.translate(primary)
        self.log.info("engine_failed", error=str(error))
        return error, primary

    def translate(self, exc: BaseException, device: int | None = None) -> EngineError:
        """``exc`` as an ``EngineError`` (itself when it already is one)."""
        if isinstance(exc, EngineError):
            return exc
        if isinstance(exc, VDIError):
            return self._vdi_error(exc, "a VDI call failed", device)
        return self.error(f"the engine failed: {type(exc).__name__}: {exc}", device)

    def _vdi_error(
        self, exc: VDIError, failed: str, device: int | None, aborted: bool = True
    ) -> EngineError:
        if aborted and isinstance(exc, VDAbortError):
            return self.aborted_error(device)
        return self.error(f"{failed}: {exc}", device)

    @contextlib.contextmanager
    def vdi_calls(
        self, failed: str, device: int | None = None, *, aborted: bool = True
    ) -> Iterator[None]:
        """The seam between the VDI and the engine: a ``VDAbortError`` raised inside
        becomes ``EngineAbortedError`` (unless ``aborted`` is false), any other
        ``VDIError`` an ``EngineError`` reading ``"{failed}: {exc}"``; both name
        ``device`` and keep the VDI error as their cause."""
        try:
            yield
        except VDIError as exc:
            raise self._vdi_error(exc, failed, device, aborted) from exc

    def record_failure(self, exc: Exception) -> None:
        if self.first_failure is None:
            self.first_failure = exc

    async def abort_and_close(self) -> None:
        """Signal abort (unless the set is gone or already aborted) and close the set.

        Shielded: it runs on the way out of a cancelled job too (a remote set's close
        bounds its own wait for the other process)."""
        if self.sds.state is ServerState.DNE:
            return
        try:
            if self.sds.abort_reason is None:
                self.sds.signal_abort()
        except VDIError:
            pass  # the set is going away whatever this says
        with anyio.CancelScope(shield=True):
            try:
                await settle(self.sds.close())
            except VDIError:
                pass

    async def close(self) -> None:
        with self.vdi_calls("close failed"):
            await settle(self.sds.close())
        self.log.debug("engine_closed")

    @contextlib.asynccontextmanager
    async def task_group(self) -> AsyncIterator[TaskSpawner]:
        """A task group whose first failure (host or task) is the one ``run`` raises."""
        async with anyio.create_task_group() as group:
            try:
                yield TaskSpawner(self, group)
            except Exception as exc:
                self.record_failure(exc)
                raise

    # --- configuration and devices ---------------------------------------------------

    @property
    def client_config(self) -> VDConfig:
        """The client's configuration inputs (``device_count``, ``features``, ...)."""
        with self.vdi_calls("a VDI call failed"):
            return self.sds.get_configuration()

    async def configure(
        self,
        *,
        features: int,
        block_size: int,
        max_transfer_size: int,
        buffer_count: int,
        buffer_size: int | None = None,
        honour_complete: bool = True,
    ) -> VDConfig:
        """begin_configuration, request_buffers, end_configuration; the final config."""
        with self.vdi_calls("the configuration was refused"):
            await settle(
                self.sds.begin_configuration(
                    features,
                    block_size,
                    0,
                    max_transfer_size,
                    self.open_timeout,
                    honour_complete=honour_complete,
                )
            )
            await settle(
                self.sds.request_buffers(buffer_size or max_transfer_size, 0, buffer_count)
            )
            await settle(self.sds.end_configuration())
        final = self.sds.configuration
        assert final is not None
        self.log.debug(
            "engine_configured",
            features=hex(final.features),
            block_size=block_size,
            max_transfer_size=max_transfer_size,
            buffer_count=buffer_count,
        )
        return final

    async def open_devices(self) -> None:
        """Open every device by name and wait (``open_timeout``) until the set is active."""
        with self.vdi_calls("opening the devices failed"):
            try:
                for name in device_names(self.set_name, self.device_count):
                    self.devices.append(await settle(self.sds.open_device(name)))
                await self.sds.wait_active(self.open_timeout)
            except VDTimeoutError as exc:
                raise self.error(
                    f"the client did not open every device within {self.open_timeout} s"
                ) from exc

    async def close_devices(self) -> None:
        for index, device in enumerate(self.devices):
            with self.vdi_calls("close_device failed", index):
                await settle(device.close_device())

    def device_label(self, index: int | None) -> str | None:
        if index is None:
            return None
        if index < len(self.devices):
            return self.devices[index].name
        return device_names(self.set_name, index + 1)[index]

    def error(
        self, message: str, device: int | None = None, *, kind: type[EngineError] = EngineError
    ) -> EngineError:
        """``kind(message)`` placed in this set and, by index, ``device``."""
        return kind(message, set_name=self.set_name, device=self.device_label(device))

    def aborted_error(self, device: int | None = None) -> EngineAbortedError:
        return EngineAbortedError(
            "the set was aborted",
            set_name=self.set_name,
            device=self.device_label(device),
            reason=self.sds.abort_reason,
        )

    # --- buffers and commands ----------------------------------------------------------

    async def allocate(self, size: int) -> memoryview:
        """A buffer of ``size`` bytes; waits (at most ``command_timeout``) for a free one."""
        try:
            with (
                self.vdi_calls(f"allocate_buffer({size}) failed"),
                anyio.fail_after(self.command_timeout),
            ):
                return await self.sds.allocate_buffer(size)
        except TimeoutError as exc:
            raise self.error(f"no buffer became free within {self.command_timeout} s") from exc

    def free(self, buffer: memoryview) -> None:
        """Give a buffer back; after an abort this does nothing (the close releases it)."""
        if self.sds.abort_reason is not None:
            return
        with self.vdi_calls("a VDI call failed"):
            self.sds.free_buffer(buffer)

    async def send(
        self,
        index: int,
        code: CommandCode,
        size: int = 0,
        position: int = 0,
        buffer: memoryview | None = None,
    ) -> PendingResult:
        """Send a command on device ``index``."""
        with self.vdi_calls(f"send_command({code.name}) failed", index, aborted=False):
            pending = self.devices[index].send_command(code, size, position, buffer)
        self.counts[index][code] += 1
        self._inflight[index].add(pending)
        return pending

    def outstanding(self, index: int) -> bool:
        """Whether device ``index`` has a buffer out: a command in flight (sent, its
        result not yet taken by the engine) or data the engine still holds (``lent``)."""
        return bool(self._inflight[index]) or self.lent[index] > 0

    async def result(self, index: int, pending: PendingResult) -> CommandResult:
        """The command's result; ``EngineAbortedError`` if it completed as aborted."""
        try:
            result = await pending.wait(self.command_timeout)
        except VDTimeoutError as exc:
            raise self.error(
                f"{pending.code.name} got no completion within {self.command_timeout} s", index
            ) from exc
        finally:
            self._inflight[index].discard(pending)
        if result.completion == Completion.OPERATION_ABORTED:
            raise self.aborted_error(index)
        if pending.code in DATA_COMMANDS:
            self.bytes[index] += result.bytes_transferred
        return result

    async def expect(self, index: int, pending: PendingResult) -> CommandResult:
        """The command's result, which must be a success (else ``CommandFailedError``);
        a READ or WRITE must also have transferred all its bytes."""
        result = await self.result(index, pending)
        if result.completion != Completion.SUCCESS:
            raise self.command_failed(index, pending.code, result.completion)
        if pending.code in DATA_COMMANDS and result.bytes_transferred != pending.size:
            raise self.error(
                f"{pending.code.name} of {pending.size} bytes completed with SUCCESS but "
                f"transferred {result.bytes_transferred}",
                index,
            )
        return result

    def command_failed(self, index: int, code: CommandCode, completion: int) -> CommandFailedError:
        return CommandFailedError(
            "the client failed a command",
            code=code,
            completion=completion,
            set_name=self.set_name,
            device=self.device_label(index),
        )

    def stats(self) -> tuple[DeviceStats, ...]:
        return tuple(
            DeviceStats(
                index=index,
                name=self.device_label(index) or "",
                bytes=self.bytes[index],
                commands=freeze_counts(self.counts[index]),
            )
            for index in range(self.device_count)
        )

    # --- command sequences every writing or positioning engine shares ---------------

    async def position_devices(self) -> None:
        """SET_POSITION to the start on every (disk-like) device."""
        sent = [
            await self.send(i, CommandCode.SET_POSITION, Whence.BEGINNING, 0)
            for i in range(self.device_count)
        ]
        for index, pending in enumerate(sent):
            result = await self.expect(index, pending)
            if result.position != 0:
                raise self.error(f"SET_POSITION to 0 reported position {result.position}", index)

    async def await_writes(
        self, index: int, receive: MemoryObjectReceiveStream[PendingWrite]
    ) -> None:
        """Check each WRITE of device ``index`` in order; its buffer goes back to the pool."""
        async for write in receive:
            await self.expect(index, write.pending)
            self.free(write.buffer)

    async def end_streams(self, *, complete: bool) -> None:
        """FLUSH every device, then COMPLETE every device if it was granted."""
        from vdistream.engines.faults import Phase  # faults imports this module

        devices = range(self.device_count)
        flushes = [await self.send(i, CommandCode.FLUSH) for i in devices]
        await self.fault(Phase.DURING_FLUSH, sent=flushes)
        for index, pending in enumerate(flushes):
            await self.expect(index, pending)
        if complete:
            completes = [await self.send(i, CommandCode.COMPLETE) for i in devices]
            for index, pending in enumerate(completes):
                await self.expect(index, pending)

    async def fault(
        self, phase: Phase, device: int | None = None, *, sent: Sequence[PendingResult] = ()
    ) -> None:
        """A fail point of ``vdistream.engines.faults``: without one, nothing to do."""
