"""``ServerSession``: the parts of ``Engine.run`` every engine shares.

An engine writes only what is particular to it (its configuration choices and its
command sequence); the session does the rest of the engine contract of
``vdistream.engines.base``:

* ``run(body)`` opens the set by name, awaits ``body(session)`` and closes the set; on
  any failure it signals abort, closes the set and raises one ``EngineError`` (the
  first failure, translated), or lets a cancellation propagate after the same cleanup.
* configuration, device opening (``device_names``), buffer allocation and command
  sending with the VDI errors translated into engine errors that name the device;
* ``result``/``expect`` wait for a command's completion (bounded by
  ``command_timeout``) and turn ``OPERATION_ABORTED`` into ``EngineAbortedError`` and a
  failure code into ``CommandFailedError``. After such a completion the engine must not
  touch that command's buffer again; the session never frees it.
* per-device statistics (``stats()``) and the fault points of ``vdistream.engines.faults``.
* ``task_group()``: a task group whose first failing task decides the error ``run``
  raises, so that the secondary failures it causes (other devices seeing the abort)
  never hide the cause.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

import anyio
import anyio.abc

from vdistream.engines.base import (
    CommandFailedError,
    DeviceStats,
    EngineAbortedError,
    EngineError,
    device_names,
    freeze_counts,
)
from vdistream.engines.faults import Action, FailPoint, InjectedFaultError, Phase
from vdistream.errors import VDAbortError, VDIError, VDTimeoutError
from vdistream.log import get_logger
from vdistream.protocol import CommandCode, CommandResult, Completion, ServerState, VDConfig
from vdistream.vdi import PendingCommand, Registry, ServerVirtualDevice, ServerVirtualDeviceSet

__all__ = ("ServerSession", "TaskSpawner")

T = TypeVar("T")

#: How often a stalled engine looks whether the set was aborted: the server side offers
#: no "wait for abort" call, and a stall must end promptly when the client gives up.
STALL_POLL_SECONDS = 0.005
#: How long a DURING_* fault waits for the client to take the commands it is "during".
TAKE_WAIT_SECONDS = 1.0

_DATA_COMMANDS = (CommandCode.READ, CommandCode.WRITE)

_log = get_logger(__name__)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


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
        fail_at: FailPoint | None = None,
        open_timeout: float | None = 60.0,
        command_timeout: float | None = None,
    ) -> None:
        self.set_name = set_name
        self.sds = ServerVirtualDeviceSet(registry=registry)
        self.fail_at = fail_at
        self.open_timeout = open_timeout
        self.command_timeout = command_timeout
        self.devices: list[ServerVirtualDevice] = []
        self.device_count = 0
        self.counts: list[Counter[CommandCode]] = []
        self.bytes: list[int] = []
        self.data_commands = 0
        self.data_bytes = 0
        self.first_failure: Exception | None = None
        #: Per device, read buffers whose data the engine has not used up yet (restore).
        self.lent: list[int] = []
        self._inflight: list[set[PendingCommand]] = []
        self._fired = False
        self._stalled = False
        self._at_eof = 0
        self.log = _log.bind(set_name=set_name)

    # --- the whole run -----------------------------------------------------------

    async def run(self, body: Callable[[ServerSession], Awaitable[T]]) -> T:
        """Open the set, await ``body(self)``, close the set (see the module docstring)."""
        try:
            self._open()
            result = await body(self)
            self.close()
        except BaseException as exc:
            failure = self._fail(exc)
            if failure is None:
                raise  # cancellation or KeyboardInterrupt: propagate it unchanged
            error, primary = failure
            if error is exc:
                raise
            if error is primary:  # an EngineError out of a task group: keep its own cause
                raise error from error.__cause__
            raise error from primary
        return result

    def _open(self) -> None:
        try:
            self.sds.open(None, self.set_name)
            config = self.sds.get_configuration()
        except VDIError as exc:
            raise EngineError(f"cannot open the set: {exc}", set_name=self.set_name) from exc
        self.device_count = config.device_count
        self.counts = [Counter() for _ in range(config.device_count)]
        self.bytes = [0] * config.device_count
        self._inflight = [set() for _ in range(config.device_count)]
        self.lent = [0] * config.device_count
        self.log.debug("engine_opened", devices=config.device_count)

    def _fail(self, exc: BaseException) -> tuple[EngineError, Exception] | None:
        """Abort and close the set; the error ``run`` raises and the failure it stands
        for (None: re-raise ``exc``)."""
        self.abort_and_close()
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
        label = self.device_label(device)
        if isinstance(exc, EngineError):
            return exc
        if isinstance(exc, VDAbortError):
            return self.aborted_error(device)
        if isinstance(exc, VDIError):
            return EngineError(f"a VDI call failed: {exc}", set_name=self.set_name, device=label)
        return EngineError(
            f"the engine failed: {type(exc).__name__}: {exc}", set_name=self.set_name, device=label
        )

    def record_failure(self, exc: Exception) -> None:
        if self.first_failure is None:
            self.first_failure = exc

    def abort_and_close(self) -> None:
        """Signal abort (unless the set is gone or already aborted) and close the set."""
        if self.sds.state is ServerState.DNE:
            return
        try:
            if self.sds.abort_reason is None:
                self.sds.signal_abort()
        except VDIError:
            pass  # the set is going away whatever this says
        try:
            self.sds.close()
        except VDIError:
            pass

    def close(self) -> None:
        try:
            self.sds.close()
        except VDAbortError as exc:
            raise self.aborted_error() from exc
        except VDIError as exc:
            raise EngineError(f"close failed: {exc}", set_name=self.set_name) from exc
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
        try:
            return self.sds.get_configuration()
        except VDIError as exc:
            raise self.translate(exc) from exc

    def configure(
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
        try:
            self.sds.begin_configuration(
                features,
                block_size,
                0,
                max_transfer_size,
                self.open_timeout,
                honour_complete=honour_complete,
            )
            self.sds.request_buffers(buffer_size or max_transfer_size, 0, buffer_count)
            self.sds.end_configuration()
        except VDAbortError as exc:
            raise self.aborted_error() from exc
        except VDIError as exc:
            raise EngineError(
                f"the configuration was refused: {exc}", set_name=self.set_name
            ) from exc
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
        try:
            for name in device_names(self.set_name, self.device_count):
                self.devices.append(self.sds.open_device(name))
            await self.sds.wait_active(self.open_timeout)
        except VDAbortError as exc:
            raise self.aborted_error() from exc
        except VDTimeoutError as exc:
            raise EngineError(
                f"the client did not open every device within {self.open_timeout} s",
                set_name=self.set_name,
            ) from exc
        except VDIError as exc:
            raise EngineError(f"opening the devices failed: {exc}", set_name=self.set_name) from exc

    def close_devices(self) -> None:
        for index, device in enumerate(self.devices):
            try:
                device.close_device()
            except VDAbortError as exc:
                raise self.aborted_error(index) from exc
            except VDIError as exc:
                raise EngineError(
                    f"close_device failed: {exc}",
                    set_name=self.set_name,
                    device=self.device_label(index),
                ) from exc

    def device_label(self, index: int | None) -> str | None:
        if index is None:
            return None
        if index < len(self.devices):
            return self.devices[index].name
        return device_names(self.set_name, index + 1)[index]

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
            with anyio.fail_after(self.command_timeout):
                return await self.sds.allocate_buffer(size)
        except TimeoutError as exc:
            raise EngineError(
                f"no buffer became free within {self.command_timeout} s",
                set_name=self.set_name,
            ) from exc
        except VDAbortError as exc:
            raise self.aborted_error() from exc
        except VDIError as exc:
            raise EngineError(
                f"allocate_buffer({size}) failed: {exc}", set_name=self.set_name
            ) from exc

    def free(self, buffer: memoryview) -> None:
        """Give a buffer back; after an abort this does nothing (the close releases it)."""
        if self.sds.abort_reason is not None:
            return
        try:
            self.sds.free_buffer(buffer)
        except VDIError as exc:
            raise self.translate(exc) from exc

    async def send(
        self,
        index: int,
        code: CommandCode,
        size: int = 0,
        position: int = 0,
        buffer: memoryview | None = None,
    ) -> PendingCommand:
        """Send a command on device ``index`` (joins a stall, if one is in progress)."""
        if self._stalled:
            await self.stall()
        try:
            pending = self.devices[index].send_command(code, size, position, buffer)
        except VDIError as exc:
            raise EngineError(
                f"send_command({code.name}) failed: {exc}",
                set_name=self.set_name,
                device=self.device_label(index),
            ) from exc
        self.counts[index][code] += 1
        self._inflight[index].add(pending)
        return pending

    def outstanding(self, index: int) -> bool:
        """Whether device ``index`` has a buffer out: a command in flight (sent, its
        result not yet taken by the engine) or data the engine still holds (``lent``)."""
        return bool(self._inflight[index]) or self.lent[index] > 0

    async def result(self, index: int, pending: PendingCommand) -> CommandResult:
        """The command's result; ``EngineAbortedError`` if it completed as aborted."""
        try:
            result = await pending.wait(self.command_timeout)
        except VDTimeoutError as exc:
            raise EngineError(
                f"{pending.code.name} got no completion within {self.command_timeout} s",
                set_name=self.set_name,
                device=self.device_label(index),
            ) from exc
        finally:
            self._inflight[index].discard(pending)
        if result.completion == Completion.OPERATION_ABORTED:
            raise self.aborted_error(index)
        if pending.code in _DATA_COMMANDS:
            self.bytes[index] += result.bytes_transferred
        return result

    async def expect(self, index: int, pending: PendingCommand) -> CommandResult:
        """The command's result, which must be a success (else ``CommandFailedError``);
        a READ or WRITE must also have transferred all its bytes."""
        result = await self.result(index, pending)
        if result.completion != Completion.SUCCESS:
            raise self.command_failed(index, pending.code, result.completion)
        if pending.code in _DATA_COMMANDS and result.bytes_transferred != pending.size:
            raise EngineError(
                f"{pending.code.name} of {pending.size} bytes completed with SUCCESS but "
                f"transferred {result.bytes_transferred}",
                set_name=self.set_name,
                device=self.device_label(index),
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

    # --- fault injection ---------------------------------------------------------------

    async def fault(
        self, phase: Phase, device: int | None = None, *, sent: Sequence[PendingCommand] = ()
    ) -> None:
        """Fire the fail point if it names ``phase`` and has not fired yet.

        ``sent`` are the commands the phase is "during" (FLUSH, CLEAR_ERROR): the fault
        waits (briefly, bounded) until the client has taken them, so that it really
        strikes while the client holds them.
        """
        point = self.fail_at
        if point is None or point.phase is not phase or self._fired:
            return
        self._fired = True
        with anyio.move_on_after(TAKE_WAIT_SECONDS):
            while not all(p.done() or p.command is not None for p in sent):  # noqa: ASYNC110
                await anyio.sleep(STALL_POLL_SECONDS)
        self.log.info("fault_injected", phase=phase.value, action=point.action.value)
        if point.action is Action.STALL:
            await self.stall()
        error = InjectedFaultError(point, set_name=self.set_name, device=self.device_label(device))
        self.record_failure(error)
        if point.action is Action.SIGNAL_ABORT:
            self.sds.signal_abort()
        raise error

    async def data_sent(self, size: int) -> None:
        """Count a data command just sent; fires a due MID_STREAM fail point."""
        self.data_commands += 1
        self.data_bytes += size
        point = self.fail_at
        if (
            point is not None
            and point.phase is Phase.MID_STREAM
            and not self._fired
            and self.data_commands >= point.after_commands
            and self.data_bytes >= point.after_bytes
            and all(self.outstanding(i) for i in range(self.device_count))
        ):
            await self.fault(Phase.MID_STREAM)

    async def data_ended(self) -> None:
        """The data is over: a MID_STREAM fail point that has not fired fires now."""
        await self.fault(Phase.MID_STREAM)

    async def stall(self) -> None:
        """Send nothing more; wait until the set is aborted, then raise."""
        self._stalled = True
        while self.sds.abort_reason is None:  # noqa: ASYNC110 - no event to wait on (see above)
            await anyio.sleep(STALL_POLL_SECONDS)
        raise self.aborted_error()
