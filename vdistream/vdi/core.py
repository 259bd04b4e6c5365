"""The shared core of a virtual device set: one object both facades drive.

``ClientVirtualDeviceSet`` and ``ServerVirtualDeviceSet`` are thin facades; every
state, queue and buffer lives here, so the two sides can never disagree. The core
keeps the two views of the set's state (the client's and the server's table of spec
§1.6) and moves them only through ``vdistream.protocol.states``.

Decisions this module makes where spec and api.md are silent:

* **No background task.** The server-timeout watchdog runs inside whichever task
  waits on the set (every wait's deadline is the earlier of its own timeout and the
  watchdog's), and every call checks it first. A set therefore owns no task that
  could outlive its users; when nobody waits and nobody calls, nothing can hang.
* **Queue bound.** A device holds at most ``MAX_QUEUED`` commands queued or
  outstanding; one more is refused with ``NO_SYSTEM_RESOURCES`` (the spec's
  ``VD_E_QUEUE_FULL`` mapping), so memory stays bounded even for buffer-less commands.
* **ClearError** is held back from ``get_command`` while the device has outstanding
  commands; while the device is in the I/O-error state no other command can be queued,
  so "outstanding when the error occurred" and "outstanding now" are the same set.
* **Timeouts**: ``None`` or a negative number waits forever (the Linux SDK's rule), ``0``
  polls. A wait that finds its answer at once does not yield to the event loop (only
  checks for cancellation), which keeps the command round trip short.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections import deque
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio.lowlevel

from vdistream.errors import (
    VDAbortError,
    VDIError,
    VDInvalidError,
    VDOpenError,
    VDProtocolError,
    VDTimeoutError,
)
from vdistream.log import get_logger
from vdistream.protocol import (
    ClientCall,
    ClientState,
    Command,
    CommandCode,
    CommandResult,
    Completion,
    DeviceState,
    HResult,
    Outcome,
    ServerCall,
    ServerState,
    SetAbortCause,
    SetEvent,
    VDConfig,
    client_event,
    server_event,
)
from vdistream.protocol.states import device_after_abort
from vdistream.vdi._notify import Notifier

if TYPE_CHECKING:
    from vdistream.vdi.buffers import BufferArea, Slot
    from vdistream.vdi.registry import Registry

__all__ = (
    "MAX_QUEUED",
    "NOT_READY",
    "DeviceCore",
    "DeviceFacade",
    "NotReady",
    "PendingCommand",
    "SetCore",
    "SetFacade",
    "SetStatistics",
)

MAX_QUEUED = 1024

_log = get_logger(__name__)

T = TypeVar("T")
S = TypeVar("S", ClientState, ServerState)
C = TypeVar("C", ClientCall, ServerCall)


@dataclasses.dataclass(frozen=True, slots=True)
class SetStatistics:
    """A snapshot of a set's load, as ``ClientVirtualDeviceSet.statistics()`` gives it
    (modelled on anyio's ``MemoryObjectStream.statistics()``)."""

    buffers_total: int  # buffers in the area
    buffers_in_use: int  # allocated by the server and not freed
    #: per device, in device order: commands sent and not yet completed (queued or held)
    outstanding: tuple[int, ...]


class NotReady:
    """What a wait's ``ready`` callback returns while the wait must go on."""


NOT_READY = NotReady()


@dataclasses.dataclass(slots=True, eq=False, repr=False)
class PendingCommand:
    """A command the server sent; await it for its ``CommandResult``.

    The awaitable form is what ``ServerVirtualDevice.send_command`` returns. It holds
    no task: awaiting it waits on the set (and runs the set's watchdog meanwhile).
    ``add_done_callback`` is the other way to learn the result: for a caller (the
    out-of-process transport) that must not spend a task per command.
    """

    _core: SetCore
    device: DeviceCore | None
    code: CommandCode
    size: int
    position: int
    slot: Slot | None = None
    slot_offset: int = 0
    serial: int = dataclasses.field(default=0, init=False)
    command: Command | None = dataclasses.field(default=None, init=False)  # once delivered
    client_views: list[memoryview] = dataclasses.field(default_factory=list, init=False)
    _notifier: Notifier = dataclasses.field(default_factory=Notifier, init=False)
    _result: CommandResult | None = dataclasses.field(default=None, init=False)
    _callbacks: list[Callable[[PendingCommand], None]] | None = dataclasses.field(
        default=None, init=False
    )

    def __post_init__(self) -> None:
        self.serial = next(self._core.serials)

    def __repr__(self) -> str:
        state = f"done {self._result}" if self._result else "pending"
        return f"<PendingCommand #{self.serial} {self.code.name} size={self.size} {state}>"

    def done(self) -> bool:
        return self._result is not None

    def result(self) -> CommandResult:
        """The result; ``RuntimeError`` if the command has not completed yet."""
        if self._result is None:
            raise RuntimeError(f"command #{self.serial} has not completed yet")
        return self._result

    async def wait(self, timeout: float | None = None) -> CommandResult:
        """The result, waiting at most ``timeout`` seconds (``VDTimeoutError`` after)."""
        core = self._core

        def ready() -> CommandResult | NotReady:
            return NOT_READY if self._result is None else self._result

        return await core.wait_for(self._notifier, ready, timeout, "command result")

    def __await__(self) -> Generator[Any, None, CommandResult]:
        return self.wait().__await__()

    def add_done_callback(self, callback: Callable[[PendingCommand], None]) -> None:
        """Call ``callback(self)`` once the command has a result: at once (before this
        returns) when it already has one, otherwise synchronously inside whatever call
        completes it (``complete_command``, an abort, the I/O-error purge).

        The callback runs inside the set's own bookkeeping, so it must be quick, must
        not call into the set, and must not raise (an exception is logged and dropped).
        """
        if self._result is not None:
            _run_callback(callback, self)
        elif self._callbacks is None:
            self._callbacks = [callback]
        else:
            self._callbacks.append(callback)

    def finish(self, result: CommandResult) -> None:
        if self._result is None:
            self._result = result
            if self.slot is not None:
                self.slot.pending -= 1
            self._notifier.notify_all()
            if self._callbacks is not None:
                callbacks, self._callbacks = self._callbacks, None
                for callback in callbacks:
                    _run_callback(callback, self)

    def release_client_views(self) -> None:
        for view in self.client_views:
            try:
                view.release()
            except BufferError:
                pass  # exported elsewhere: the export keeps the memory alive (decision 7)
        self.client_views.clear()


def _run_callback(callback: Callable[[T], None], value: T) -> None:
    try:
        callback(value)
    except Exception:
        # The set's bookkeeping must finish whatever a listener does.
        _log.exception("vdi_callback_failed", callback=repr(callback))


class _CloseMarker:
    """Queued by ``close_device``: the client gets every earlier command, then the close."""


CLOSE_MARKER = _CloseMarker()


class DeviceCore:
    """One virtual device: its name, its queue, its outstanding commands."""

    def __init__(self, core: SetCore, index: int) -> None:
        self.core = core
        self.index = index
        self.name: str | None = None
        self.client_owner: object | None = None  # the client set object that opened it
        self.server_opened = False
        self.state = DeviceState.ACTIVE  # CLOSED once the server closed it
        self.queue: deque[PendingCommand | _CloseMarker] = deque()
        self.outstanding: dict[int, PendingCommand] = {}
        self.close_delivered = False
        self.notifier = Notifier()

    @property
    def label(self) -> str:
        return self.name if self.name is not None else f"#{self.index}"

    def held(self) -> int:
        return len(self.queue) + len(self.outstanding)


class SetCore:
    """State, devices and buffers of one virtual device set."""

    def __init__(
        self, registry: Registry, instance: str | None, name: str, config: VDConfig
    ) -> None:
        from vdistream.vdi.buffers import BufferArea

        self.registry = registry
        self.instance = instance
        self.name = name
        self.config = config
        self.final_config: VDConfig | None = None
        self.client_state = ClientState.CONFIGURABLE
        self.server_state = ServerState.DNE
        self.devices = [DeviceCore(self, i) for i in range(config.device_count)]
        self.area: BufferArea = BufferArea(
            prefix_zone_size=config.prefix_zone_size, client_alignment=config.alignment
        )
        self.primary_closed = False
        self.server_closed = False  # a server closed it: no server can open it again
        self.notifier = Notifier()  # configuration, activation, abort
        self.buffers_notifier = Notifier()  # a buffer was freed
        self.serials = itertools.count(1)
        self.aborted_by: SetAbortCause | None = None
        self.abort_reason: str | None = None
        self.pending_count = 0
        self.watch_since = 0.0
        # Server-side choices from begin_configuration
        self.media_features = 0
        self.block_size = 0
        self.alignment = 0
        self.max_transfer_size = 0
        self.honour_complete = True
        #: called after every set event (configured, activated, terminated, aborted)
        self.listeners: list[Callable[[], None]] = []

    # --- state -------------------------------------------------------------------

    @property
    def aborted(self) -> bool:
        return self.aborted_by is not None

    @property
    def server_attached(self) -> bool:
        return self.server_state is not ServerState.DNE

    def event(self, event: SetEvent) -> None:
        self.client_state = client_event(self.client_state, event)
        if self.server_attached:
            self.server_state = server_event(self.server_state, event)
        self.notifier.notify_all()
        for listener in tuple(self.listeners):
            try:
                listener()
            except Exception:
                # The set's bookkeeping must finish whatever a listener does.
                _log.exception("vdi_listener_failed", listener=repr(listener))

    def abort(self, cause: SetAbortCause, reason: str) -> None:
        """Put the whole set in the abort state at once (spec §5.1)."""
        if self.aborted:
            return
        self.aborted_by, self.abort_reason = cause, reason
        self.event(SetEvent.ABORTED)  # the waiters it wakes run once this returns
        aborted = CommandResult(Completion.OPERATION_ABORTED)
        for device in self.devices:
            device.state = device_after_abort(device.state)
            while device.queue:
                item = device.queue.popleft()
                if isinstance(item, PendingCommand):
                    item.finish(aborted)
            # Outstanding commands complete for the server now; the client keeps the
            # buffers (and its views) until it closes (rule 4 of §5.1).
            for pending in device.outstanding.values():
                pending.finish(aborted)
            device.notifier.notify_all()
        self.pending_count = 0
        self.buffers_notifier.notify_all()

    def abort_error(self, what: str, device: DeviceCore | None = None) -> VDIError:
        message = f"{what}: the set was aborted ({self.abort_reason})"
        return self.error(VDAbortError, message, device=device, state="ABORTED")

    def timeout_error(self, what: str, device: DeviceCore | None = None) -> VDIError:
        state = self.client_state.name
        return self.error(VDTimeoutError, f"{what}: timed out", device=device, state=state)

    def error(
        self, cls: type[VDIError], message: str, *, device: DeviceCore | None, state: object
    ) -> VDIError:
        return cls(
            message, set_name=self.name, device=device.label if device else None, state=state
        )

    # --- devices -------------------------------------------------------------------

    def open_device(
        self, name: str, opened: Callable[[DeviceCore], bool], state: object
    ) -> DeviceCore:
        """The device ``name`` (a new name claims the next free slot, decision 1) for the
        side whose ``opened`` tells which devices it opened; the caller marks it opened."""
        if all(opened(d) for d in self.devices):
            raise self.error(
                VDOpenError, "open_device: every device is already open", device=None, state=state
            )
        named = [d for d in self.devices if d.name == name] or [
            d for d in self.devices if d.name is None
        ]
        if not named:
            raise self.error(
                VDInvalidError,
                f"open_device: the set has no device {name!r}",
                device=None,
                state=state,
            )
        device = named[0]
        if opened(device):
            raise self.error(
                VDProtocolError,
                "open_device: this device is already open",
                device=device,
                state=state,
            )
        device.name = name
        return device

    def check_active(self) -> None:
        if all(d.client_owner is not None and d.server_opened for d in self.devices):
            self.event(SetEvent.ACTIVATED)

    # --- the watchdog --------------------------------------------------------------

    def watch_deadline(self) -> float | None:
        timeout_ms = self.config.server_timeout_ms
        if timeout_ms <= 0 or self.pending_count <= 0 or self.aborted:
            return None
        return self.watch_since + 2 * timeout_ms / 1000

    def check_watchdog(self) -> None:
        deadline = self.watch_deadline()
        if deadline is not None and time.monotonic() >= deadline:
            self.abort(
                SetAbortCause.SERVER_TIMEOUT,
                f"server timeout: commands pending and none completed for 2 x "
                f"{self.config.server_timeout_ms} ms",
            )

    def command_added(self) -> None:
        if self.pending_count == 0:
            self.watch_since = time.monotonic()
            if self.config.server_timeout_ms > 0:
                # The clock starts: waits begun before it (a pump idle on another
                # device) must re-read their deadline, or no one runs the watchdog.
                for device in self.devices:
                    device.notifier.notify_all()
                self.notifier.notify_all()
                self.buffers_notifier.notify_all()
        self.pending_count += 1

    def command_finished(self) -> None:
        self.pending_count -= 1
        self.watch_since = time.monotonic()

    # --- waiting -------------------------------------------------------------------

    async def wait_for(
        self,
        notifier: Notifier,
        ready: Callable[[], T | NotReady],
        timeout: float | None,
        what: str,
        device: DeviceCore | None = None,
    ) -> T:
        """Wait until ``ready()`` returns something other than NOT_READY.

        ``ready`` raises to end the wait with an error (an abort, a close). The wait
        wakes at the earlier of its own deadline and the watchdog's.
        """
        await anyio.lowlevel.checkpoint_if_cancelled()
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        while True:
            self.check_watchdog()
            value = ready()
            if not isinstance(value, NotReady):
                return value
            if deadline is not None and time.monotonic() >= deadline:
                raise self.timeout_error(what, device)
            watch = self.watch_deadline()
            wake = (
                deadline if watch is None else watch if deadline is None else min(deadline, watch)
            )
            await notifier.wait(wake)

    # --- teardown --------------------------------------------------------------------

    def maybe_release_area(self) -> None:
        if self.primary_closed and not self.server_attached:
            self.area.close()

    def statistics(self) -> SetStatistics:
        return SetStatistics(
            buffers_total=self.area.slot_count,
            buffers_in_use=len(self.area.in_use()),
            outstanding=tuple(device.held() for device in self.devices),
        )


_ERRORS: dict[HResult, type[VDIError]] = {
    HResult.PROTOCOL: VDProtocolError,
    HResult.ABORT: VDAbortError,
    HResult.OPEN: VDOpenError,
}


class SetFacade(Generic[S, C]):
    """What the client's and the server's set objects share: the core they serve,
    their view of its state, and the check of every call against their state table."""

    _DNE: S  # the state of an object with no set open
    _view: Callable[[SetCore], S]  # this side's view of the set's state
    _transition: Callable[[S, C], Outcome]  # this side's state table

    def __init__(self, *, registry: Registry | None = None) -> None:
        from vdistream.vdi.registry import default_registry

        self._registry = registry if registry is not None else default_registry
        self._core: SetCore | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {self.state.name}>"

    @property
    def state(self) -> S:
        return self._view(self._core) if self._core is not None else self._DNE

    @property
    def name(self) -> str | None:
        return self._core.name if self._core is not None else None

    @property
    def abort_reason(self) -> str | None:
        """Why the set aborted, in words; ``None`` while it has not."""
        return self._core.abort_reason if self._core is not None else None

    @property
    def aborted_by(self) -> SetAbortCause | None:
        """Why the set aborted, as a ``SetAbortCause``; ``None`` while it has not."""
        return self._core.aborted_by if self._core is not None else None

    def _error(
        self, cls: type[VDIError], message: str, device: DeviceCore | None = None
    ) -> VDIError:
        """``cls`` naming this object's set, ``device`` and state (a set is open)."""
        assert self._core is not None
        return self._core.error(cls, message, device=device, state=self.state.name)

    def _require_none(self, what: str) -> None:
        """Refuse to open or create a set while this object holds one."""
        if self._core is not None:
            raise VDProtocolError(
                f"{what}: a set is already open on this object",
                set_name=self._core.name,
                state=self.state.name,
            )

    def _check_live(self, core: SetCore, what: str, device: DeviceCore | None = None) -> None:
        """For a wait: end it once the set aborted or this object closed it."""
        if core.aborted:
            raise core.abort_error(what, device)
        if self._core is not core:
            raise VDProtocolError(
                f"{what}: the set was closed",
                set_name=core.name,
                device=device.label if device is not None else None,
            )

    def _enter(self, call: C, device: DeviceCore | None = None) -> SetCore:
        """Check ``call`` against this side's table; the core when it may go on."""
        core = self._require_open(call.value)
        core.check_watchdog()
        outcome = self._transition(self.state, call)
        if outcome.result is HResult.ABORT:
            raise core.abort_error(call.value, device)
        if not outcome.ok:
            raise self._error(_ERRORS[outcome.result], f"{call.value} is not allowed now", device)
        return core

    def _require_open(self, what: str) -> SetCore:
        if self._core is None:
            raise VDProtocolError(f"{what}: no set is open on this object", state="DNE")
        return self._core


F = TypeVar("F", bound=SetFacade[Any, Any])


class DeviceFacade(Generic[F]):
    """What both sides' device objects share: the device, and the set object that
    opened it (whose set it must still be)."""

    def __init__(self, owner: F, device: DeviceCore) -> None:
        self._owner = owner
        self.core = device

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} of {self._owner!r}>"

    @property
    def name(self) -> str:
        return self.core.label

    def _invalid(self, message: str) -> VDInvalidError:
        return VDInvalidError(message, set_name=self.core.core.name, device=self.name)

    def _own_set(self, what: str) -> SetCore:
        """The device's set, while the object that opened the device still holds it."""
        if self._owner._core is not self.core.core:
            raise VDProtocolError(
                f"{what}: this device's set was closed",
                set_name=self.core.core.name,
                device=self.name,
                state="DNE",
            )
        return self.core.core
