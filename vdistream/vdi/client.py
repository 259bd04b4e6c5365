"""The client side of a virtual device set: the backup application (spec §4.2).

Results per state follow the client table of spec §1.6 as encoded in
``vdistream.protocol.states``, with api.md's decisions applied.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vdistream.errors import (
    VDClosedError,
    VDInstanceNameError,
    VDInvalidError,
    VDNotSupportedError,
    VDOpenError,
    VDProtocolError,
)
from vdistream.protocol import (
    ClientCall,
    ClientState,
    Command,
    CommandCode,
    CommandResult,
    Completion,
    DeviceState,
    SetAbortCause,
    SetEvent,
    VDConfig,
    client_transition,
)
from vdistream.protocol.states import device_after_completion
from vdistream.vdi.core import (
    CLOSE_MARKER,
    NOT_READY,
    DeviceFacade,
    NotReady,
    PendingCommand,
    SetCore,
    SetFacade,
    SetStatistics,
)
from vdistream.vdi.registry import Registry

if TYPE_CHECKING:
    from types import TracebackType

__all__ = ("ClientVirtualDevice", "ClientVirtualDeviceSet")

_U32 = 0xFFFFFFFF


def _client_abort_reason(reason: str | None) -> str:
    return f"the client signalled abort: {reason}" if reason else "the client signalled abort"


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not name or "\\" in name:
        raise VDInvalidError(f"{what} must be a non-empty string without backslashes: {name!r}")
    return name


class ClientVirtualDeviceSet(SetFacade[ClientState, ClientCall]):
    """The client's handle on a set: create it, wait for configuration, open devices.

    One object serves one set at a time; after ``close()`` it can ``create`` again.
    A *secondary* object (``open_in_secondary_ex``) joins a set another object created
    and serves some of its devices.
    """

    _DNE = ClientState.DNE
    _view = staticmethod(lambda core: core.client_state)
    _transition = staticmethod(client_transition)

    def __init__(self, *, registry: Registry | None = None) -> None:
        super().__init__(registry=registry)
        self._primary = False
        self._devices: list[ClientVirtualDevice] = []

    def statistics(self) -> SetStatistics:
        """Buffers in use and commands outstanding per device, now."""
        return self._require_open("statistics").statistics()

    # --- creation ------------------------------------------------------------------

    def create_ex(self, instance: str | None, name: str, config: VDConfig) -> None:
        """Create the set and publish it under ``name`` (spec CreateEx)."""
        self._require_none("create")
        if instance is not None and (not isinstance(instance, str) or "\\" in instance):
            raise VDInstanceNameError(
                f"instance name {instance!r} is not valid (no machine prefix allowed)",
                set_name=name if isinstance(name, str) else None,
            )
        _check_name(name, "the set name")
        if not isinstance(config, VDConfig):
            raise VDNotSupportedError(f"config must be a VDConfig, not {type(config).__name__}")
        problems = config.client_problems()
        if problems:
            raise VDNotSupportedError("; ".join(problems), set_name=name, state="DNE")
        core = SetCore(self._registry, instance, name, config)
        self._registry.claim(instance, name, core)
        self._core = core
        self._primary = True
        self._devices = []

    def create(self, name: str, config: VDConfig) -> None:
        self.create_ex(None, name, config)

    def open_in_secondary_ex(self, instance: str | None, name: str) -> None:
        """Join a set another object created, to serve some of its devices."""
        self._require_none("open_in_secondary")
        _check_name(name, "the set name")
        core = self._registry.lookup(instance, name)
        if core is None or core.primary_closed:
            raise VDProtocolError(
                "open_in_secondary: no virtual device set of this name exists", set_name=name
            )
        if core.aborted:
            raise core.abort_error("open_in_secondary")
        if core.client_state not in (ClientState.INITIALIZING, ClientState.ACTIVE):
            raise core.error(
                VDProtocolError,
                "open_in_secondary: the set is not ready for secondary clients",
                device=None,
                state=core.client_state.name,
            )
        self._core = core
        self._primary = False
        self._devices = []

    def open_in_secondary(self, name: str) -> None:
        self.open_in_secondary_ex(None, name)

    # --- configuration and devices -------------------------------------------------

    async def get_configuration(self, timeout: float | None = None) -> VDConfig:
        """The final configuration, once the server ended configuring it."""
        core = self._enter(ClientCall.GET_CONFIGURATION)

        def ready() -> VDConfig | NotReady:
            self._check_live(core, "get_configuration")
            return NOT_READY if core.final_config is None else core.final_config

        return await core.wait_for(core.notifier, ready, timeout, "get_configuration")

    def open_device(self, name: str) -> ClientVirtualDevice:
        core = self._enter(ClientCall.OPEN_DEVICE)
        _check_name(name, "the device name")
        device = core.open_device(
            name, lambda d: d.client_owner is not None, core.client_state.name
        )
        device.client_owner = self
        facade = ClientVirtualDevice(self, device)
        self._devices.append(facade)
        core.check_active()
        return facade

    # --- abort and close -----------------------------------------------------------

    def signal_abort(self, reason: str | None = None) -> None:
        """Abort the whole set at once; idempotent, never blocks. ``reason`` (beyond
        api.md) says why in the client's words; it follows "the client signalled
        abort" in the set's ``abort_reason``, which an engine in another process gets
        too (so ``vdistream feed`` can say why its backup stopped)."""
        core = self._enter(ClientCall.SIGNAL_ABORT)
        core.abort(SetAbortCause.CLIENT, _client_abort_reason(reason))

    def close(self) -> None:
        """Release the set (decision 3 of api.md).

        After an abort or a normal termination this returns ``None``. If a device this
        object opened had not delivered its close, the set is aborted, everything is
        released, and then ``VDOpenError`` is raised.
        """
        core = self._enter(ClientCall.CLOSE)
        open_devices = [d.core.label for d in self._devices if not d.core.close_delivered]
        terminated = core.aborted or core.client_state is ClientState.NORMALLY_TERMINATED
        raise_open = not terminated and bool(open_devices)
        if not terminated and (raise_open or self._primary):
            core.abort(
                SetAbortCause.CLIENT,
                "the client closed the set before it terminated"
                + (f" (devices still open: {', '.join(open_devices)})" if open_devices else ""),
            )
        for facade in self._devices:
            for pending in facade.core.outstanding.values():
                pending.release_client_views()
        self._devices = []
        self._core = None
        if self._primary:
            core.primary_closed = True
            self._registry.release(core.instance, core.name, core)
            core.maybe_release_area()
        core.notifier.notify_all()
        if raise_open:
            raise VDOpenError(
                f"close: devices were still open ({', '.join(open_devices)}); the set was "
                "aborted and released",
                set_name=core.name,
                state="ACTIVE",
            )

    # --- buffer handles ------------------------------------------------------------

    def get_buffer_handle(self, buffer: memoryview) -> int:
        """A handle another client object of this set can map to the same bytes."""
        core = self._require_open("get_buffer_handle")
        for device in core.devices:
            for pending in device.outstanding.values():
                if any(view is buffer for view in pending.client_views):
                    return pending.serial
        raise self._error(
            VDInvalidError, "get_buffer_handle: not the buffer of an outstanding READ or WRITE"
        )

    def map_buffer_handle(self, handle: int) -> memoryview:
        core = self._require_open("map_buffer_handle")
        for device in core.devices:
            pending = device.outstanding.get(handle) if isinstance(handle, int) else None
            if pending is not None and pending.slot is not None and pending.command:
                view = pending.slot.data(pending.slot_offset, pending.size)
                if pending.code is CommandCode.WRITE:
                    view = view.toreadonly()
                pending.client_views.append(view)
                return view
        raise self._error(
            VDInvalidError,
            f"map_buffer_handle: {handle!r} is not a handle of an outstanding buffer",
        )

    # --- conveniences ----------------------------------------------------------------

    async def __aenter__(self) -> ClientVirtualDeviceSet:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._core is None:
            return
        if exc is not None:
            self.signal_abort()
        self.close()


class ClientVirtualDevice(DeviceFacade[ClientVirtualDeviceSet]):
    """One device as the client sees it: get commands, complete them."""

    def _set(self, call: ClientCall) -> SetCore:
        self._own_set(call.value)
        return self._owner._enter(call, self.core)

    async def get_command(self, timeout: float | None = None) -> Command:
        """The next command in stream order; ``VDClosedError`` at the device's end."""
        core = self._set(ClientCall.GET_COMMAND)
        device = self.core

        def ready() -> Command | NotReady:
            self._owner._check_live(core, "get_command", device)
            if device.close_delivered:
                raise self._closed_error(core)
            if not device.queue:
                return NOT_READY
            head = device.queue[0]
            if head is CLOSE_MARKER:
                device.queue.popleft()
                device.close_delivered = True
                if all(d.close_delivered for d in core.devices):
                    core.event(SetEvent.TERMINATED)
                raise self._closed_error(core)
            assert isinstance(head, PendingCommand)
            if head.code is CommandCode.CLEAR_ERROR and device.outstanding:
                return NOT_READY  # §3.7: ClearError waits for the outstanding commands
            device.queue.popleft()
            return self._deliver(head)

        return await core.wait_for(device.notifier, ready, timeout, "get_command", device)

    def _closed_error(self, core: SetCore) -> VDClosedError:
        return VDClosedError(
            "get_command: the server closed this device",
            set_name=core.name,
            device=self.name,
            state=core.client_state.name,
        )

    def _deliver(self, pending: PendingCommand) -> Command:
        buffer = prefix = None
        slot = pending.slot
        if slot is not None:
            buffer = slot.data(pending.slot_offset, pending.size)
            if pending.code is CommandCode.WRITE:
                buffer = buffer.toreadonly()
            pending.client_views.append(buffer)
            if slot.prefix_size:
                prefix = slot.prefix()
                pending.client_views.append(prefix)
        command = Command(
            code=pending.code,
            size=pending.size,
            position=pending.position,
            buffer=buffer,
            prefix=prefix,
            serial=pending.serial,
        )
        pending.command = command
        self.core.outstanding[pending.serial] = pending
        return command

    def complete_command(
        self,
        command: Command,
        completion: int,
        bytes_transferred: int = 0,
        position: int = 0,
    ) -> None:
        """Hand ``command`` back with its result; its buffer belongs to the server again."""
        device = self.core
        core = self._own_set("complete_command")
        core.check_watchdog()
        if core.aborted:
            raise core.abort_error("complete_command", device)
        pending = device.outstanding.get(command.serial) if isinstance(command, Command) else None
        if pending is None or pending.command is not command:
            cls = VDInvalidError if core.client_state is ClientState.ACTIVE else VDProtocolError
            raise self._owner._error(
                cls,
                f"complete_command: {command!r} is not an outstanding command of this device",
                device,
            )
        if not isinstance(completion, int) or not 0 <= completion <= _U32:
            raise self._owner._error(
                VDInvalidError,
                f"complete_command: completion code {completion!r} is not a Win32 code",
                device,
            )
        limit = pending.size if pending.slot is not None else _U32
        if not isinstance(bytes_transferred, int) or not 0 <= bytes_transferred <= limit:
            raise self._owner._error(
                VDInvalidError,
                f"complete_command: bytes_transferred={bytes_transferred!r} is outside 0..{limit}",
                device,
            )
        if not isinstance(position, int):
            raise self._owner._error(
                VDInvalidError, f"complete_command: position {position!r} is not an integer", device
            )
        del device.outstanding[pending.serial]
        pending.release_client_views()
        before = device.state
        device.state = device_after_completion(
            device.state, pending.code is CommandCode.CLEAR_ERROR, completion
        )
        if before is not DeviceState.ERRORED and device.state is DeviceState.ERRORED:
            self._purge_queue(core)
        pending.finish(CommandResult(completion, bytes_transferred, position))
        core.command_finished()
        device.notifier.notify_all()

    def _purge_queue(self, core: SetCore) -> None:
        """§3.7: queued, undelivered commands complete with IO_DEVICE, unseen."""
        kept: list[PendingCommand | object] = []
        refused = CommandResult(Completion.IO_DEVICE)
        while self.core.queue:
            item = self.core.queue.popleft()
            if isinstance(item, PendingCommand) and item.code is not CommandCode.CLEAR_ERROR:
                item.finish(refused)
                core.command_finished()
            else:
                kept.append(item)
        self.core.queue.extend(kept)  # type: ignore[arg-type]
