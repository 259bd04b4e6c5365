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

import itertools
import time
from collections import deque
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, TypeVar

import anyio.lowlevel

from vdistream.errors import VDAbortError, VDIError, VDTimeoutError
from vdistream.protocol import (
    ClientState,
    Command,
    CommandCode,
    CommandResult,
    Completion,
    DeviceState,
    ServerState,
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

__all__ = ("MAX_QUEUED", "NOT_READY", "DeviceCore", "NotReady", "PendingCommand", "SetCore")

MAX_QUEUED = 1024

T = TypeVar("T")


class NotReady:
    """What a wait's ``ready`` callback returns while the wait must go on."""


NOT_READY = NotReady()


class PendingCommand:
    """A command the server sent; await it for its ``CommandResult``.

    The awaitable form is what ``ServerVirtualDevice.send_command`` returns. It holds
    no task: awaiting it waits on the set (and runs the set's watchdog meanwhile).
    """

    __slots__ = (
        "_core",
        "_notifier",
        "_result",
        "aborted_while_held",
        "client_views",
        "code",
        "command",
        "device",
        "position",
        "serial",
        "size",
        "slot",
        "slot_offset",
    )

    def __init__(
        self,
        core: SetCore,
        device: DeviceCore | None,
        code: CommandCode,
        size: int,
        position: int,
        slot: Slot | None = None,
        slot_offset: int = 0,
    ) -> None:
        self._core = core
        self._notifier = Notifier()
        self._result: CommandResult | None = None
        self.device = device
        self.code = code
        self.size = size
        self.position = position
        self.slot = slot
        self.slot_offset = slot_offset
        self.serial = next(core.serials)
        self.command: Command | None = None  # set once delivered to the client
        self.client_views: list[memoryview] = []
        self.aborted_while_held = False

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

        return await core.wait_for(
            self._notifier, ready, timeout, lambda: core.timeout_error("command result")
        )

    def __await__(self) -> Generator[Any, None, CommandResult]:
        return self.wait().__await__()

    def finish(self, result: CommandResult) -> None:
        if self._result is None:
            self._result = result
            if self.slot is not None:
                self.slot.pending -= 1
            self._notifier.notify_all()

    def release_client_views(self) -> None:
        for view in self.client_views:
            try:
                view.release()
            except BufferError:
                pass  # exported elsewhere: the export keeps the memory alive (decision 7)
        self.client_views.clear()


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
        self.state = DeviceState.ACTIVE
        self.queue: deque[PendingCommand | _CloseMarker] = deque()
        self.outstanding: dict[int, PendingCommand] = {}
        self.server_closed = False
        self.close_delivered = False
        self.notifier = Notifier()
        self.bytes_completed = 0
        self.commands_completed = 0

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
        self.server_attached = False
        self.primary_closed = False
        self.server_closed = False
        self.notifier = Notifier()  # configuration, activation, abort
        self.buffers_notifier = Notifier()  # a buffer was freed
        self.serials = itertools.count(1)
        self.abort_reason: str | None = None
        self.pending_count = 0
        self.watch_since = 0.0
        # Server-side choices from begin_configuration
        self.media_features = 0
        self.block_size = 0
        self.alignment = 0
        self.max_transfer_size = 0
        self.honour_complete = True

    # --- state -------------------------------------------------------------------

    @property
    def aborted(self) -> bool:
        return self.abort_reason is not None

    def event(self, event: SetEvent) -> None:
        self.client_state = client_event(self.client_state, event)
        if self.server_attached:
            self.server_state = server_event(self.server_state, event)
        self.notifier.notify_all()

    def abort(self, reason: str) -> None:
        """Put the whole set in the abort state at once (spec §5.1)."""
        if self.aborted:
            return
        self.abort_reason = reason
        self.client_state = client_event(self.client_state, SetEvent.ABORTED)
        if self.server_attached:
            self.server_state = server_event(self.server_state, SetEvent.ABORTED)
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
                pending.aborted_while_held = True
                pending.finish(aborted)
            device.notifier.notify_all()
        self.pending_count = 0
        self.notifier.notify_all()
        self.buffers_notifier.notify_all()

    def abort_error(self, what: str, device: DeviceCore | None = None) -> VDAbortError:
        return VDAbortError(
            f"{what}: the set was aborted ({self.abort_reason})",
            set_name=self.name,
            device=device.label if device else None,
            state="ABORTED",
        )

    def timeout_error(self, what: str, device: DeviceCore | None = None) -> VDTimeoutError:
        return VDTimeoutError(
            f"{what}: timed out",
            set_name=self.name,
            device=device.label if device else None,
            state=self.client_state.name,
        )

    def error(
        self, cls: type[VDIError], message: str, *, device: DeviceCore | None, state: object
    ) -> VDIError:
        return cls(
            message, set_name=self.name, device=device.label if device else None, state=state
        )

    # --- devices -------------------------------------------------------------------

    def device_named(self, name: str) -> DeviceCore | None:
        for device in self.devices:
            if device.name == name:
                return device
        return None

    def claim_device(self, name: str) -> DeviceCore | None:
        """The device of this name, claiming the next free slot for a new name."""
        device = self.device_named(name)
        if device is not None:
            return device
        for device in self.devices:
            if device.name is None:
                device.name = name
                return device
        return None

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
                f"server timeout: commands pending and none completed for 2 x "
                f"{self.config.server_timeout_ms} ms"
            )

    def command_added(self) -> None:
        if self.pending_count == 0:
            self.watch_since = time.monotonic()
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
        on_timeout: Callable[[], VDIError],
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
                raise on_timeout()
            watch = self.watch_deadline()
            wake = (
                deadline if watch is None else watch if deadline is None else min(deadline, watch)
            )
            await notifier.wait(wake)

    # --- teardown --------------------------------------------------------------------

    def maybe_release_area(self) -> None:
        if self.primary_closed and not self.server_attached:
            self.area.close()
