"""The server side of a virtual device set: the database engine (spec §1.7).

The engine opens a set a client created, configures it, allocates buffers from the
set's buffer area and sends commands on each device. ``send_command`` never raises for
a device-level refusal: as in the spec, the refusal comes back as the result's
completion code (``IO_DEVICE``, ``OPERATION_ABORTED``, ``INVALID_HANDLE``,
``NO_SYSTEM_RESOURCES``). Calls with wrong arguments raise ``VDInvalidError``.

Choices beyond api.md:

* ``begin_configuration`` grants ``COMPLETE_ENABLED`` when the client asked for
  ``REQUEST_COMPLETE`` unless ``honour_complete=False`` (a server that, like SQL
  Server before KB3188454, never sends COMPLETE). Its ``timeout`` (seconds) bounds a
  wait for the client that this in-process model never needs; it is validated and
  kept.
* ``open`` of a set that already has a server, or that has left the configurable
  state, raises ``VDInvalidError``: such a set is not accessible (spec: Open only
  knows NOERROR and VD_E_INVALID).
* ``free_buffer`` of a buffer that an outstanding command still uses raises
  ``VDInvalidError``: handing it out again would corrupt the client's I/O.

What the out-of-process transport (``vdistream.transport.host``, which drives this
object on behalf of an engine in another process) needs, public: ``segment_files()``
(the buffer area's memfds), ``buffer_position()``/``buffer_start()`` (a buffer as
(segment, offset), the way the other process names it), ``add_state_listener()`` (to
tell the other process of activation and aborts it did not cause), and
``signal_abort(cause=, reason=)`` (to abort for the other process's death).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from vdistream.errors import VDClosedError, VDInvalidError, VDMemoryError, VDProtocolError
from vdistream.protocol import (
    ClientState,
    CommandCode,
    CommandResult,
    Completion,
    DeviceState,
    Features,
    HResult,
    ServerCall,
    ServerState,
    SetAbortCause,
    SetEvent,
    VDConfig,
    server_transition,
)
from vdistream.protocol.commands import BUFFER_COMMANDS
from vdistream.protocol.config import (
    ALIGNMENT_MAX,
    MAX_IO_DEPTH,
    is_power_of_two,
    valid_block_size,
    valid_max_transfer_size,
    valid_server_alignment,
)
from vdistream.protocol.states import device_after_close, device_refusal
from vdistream.vdi.core import (
    CLOSE_MARKER,
    MAX_QUEUED,
    NOT_READY,
    DeviceFacade,
    NotReady,
    PendingCommand,
    SetCore,
    SetFacade,
)
from vdistream.vdi.registry import Registry

if TYPE_CHECKING:
    from types import TracebackType

    from vdistream.vdi.buffers import SegmentFile, Slot

__all__ = ("ServerVirtualDevice", "ServerVirtualDeviceSet")

_MEDIA = Features.WRITE_MEDIA | Features.READ_MEDIA
_I64 = 1 << 63


class ServerVirtualDeviceSet(SetFacade[ServerState, ServerCall]):
    """The engine's handle on a set created by a client."""

    _DNE = ServerState.DNE
    _view = staticmethod(lambda core: core.server_state)
    _transition = staticmethod(server_transition)

    def __init__(self, *, registry: Registry | None = None) -> None:
        super().__init__(registry=registry)
        self._listeners: list[Callable[[], None]] = []

    @property
    def configuration(self) -> VDConfig | None:
        """The final configuration once ``end_configuration`` ran."""
        return self._core.final_config if self._core is not None else None

    # --- opening and configuring ---------------------------------------------------

    def open(self, instance: str | None, name: str) -> None:
        self._require_none("open")
        core = self._registry.lookup(instance, name) if isinstance(name, str) else None
        if core is None:
            raise VDInvalidError("open: no virtual device set of this name exists", set_name=name)
        if (
            core.server_attached
            or core.server_closed
            or core.client_state is not ClientState.CONFIGURABLE
        ):
            raise VDInvalidError(
                "open: the set is not accessible (already served, or no longer configurable)",
                set_name=name,
                state=core.client_state.name,
            )
        core.server_state = ServerState.CONNECTED
        self._core = core

    def get_configuration(self) -> VDConfig:
        """The client's configuration inputs."""
        core = self._enter(ServerCall.GET_CONFIGURATION)
        return core.config

    def begin_configuration(
        self,
        features: int,
        block_size: int,
        alignment: int,
        max_transfer_size: int,
        timeout: float | None = None,
        *,
        honour_complete: bool = True,
    ) -> None:
        core = self._enter(ServerCall.BEGIN_CONFIGURATION)
        problems = []
        if (
            not isinstance(features, int)
            or not features & _MEDIA
            or features & ~(_MEDIA | Features.COMPLETE_ENABLED)
        ):
            problems.append(f"features 0x{features:x} must be WRITE_MEDIA and/or READ_MEDIA")
        if not isinstance(block_size, int) or not valid_block_size(block_size):
            problems.append(f"block_size={block_size!r} is not a power of two in 512..65536")
        if alignment == 0:
            alignment = block_size
        elif not isinstance(alignment, int) or not valid_server_alignment(alignment, block_size):
            problems.append(
                f"alignment={alignment!r} is not a power of two between block_size and 64 KiB"
            )
        if not isinstance(max_transfer_size, int) or not valid_max_transfer_size(max_transfer_size):
            problems.append(
                f"max_transfer_size={max_transfer_size!r} is not a multiple of 64 KiB "
                "in 64 KiB..4 MiB"
            )
        if timeout is not None and (not isinstance(timeout, int | float) or timeout < 0):
            problems.append(f"timeout={timeout!r} is not a number of seconds")
        if problems:
            raise self._error(VDInvalidError, "begin_configuration: " + "; ".join(problems))
        core.media_features = features & _MEDIA
        core.block_size = block_size
        core.alignment = alignment
        core.max_transfer_size = max_transfer_size
        core.honour_complete = honour_complete or bool(features & Features.COMPLETE_ENABLED)
        core.server_state = ServerState.CONFIGURABLE

    def request_buffers(self, size: int, alignment: int, count: int) -> None:
        """Declare ``count`` buffers of ``size`` data bytes (spec RequestBuffers)."""
        core = self._enter(ServerCall.REQUEST_BUFFERS)
        alignment = self._check_alignment(core, "request_buffers", alignment)
        if not isinstance(size, int) or size <= 0 or not isinstance(count, int) or count <= 0:
            raise self._error(
                VDInvalidError,
                f"request_buffers: size={size!r} and count={count!r} must be positive",
            )
        if core.server_state is ServerState.CONFIGURABLE:
            core.area.declare(size, alignment, count)
        else:
            core.area.extend(size, alignment, count)
            core.buffers_notifier.notify_all()

    def query_available_buffers(self, size: int, alignment: int = 0) -> int:
        """How many free buffers could satisfy ``allocate_buffer(size, alignment)`` now."""
        core = self._enter(ServerCall.QUERY_AVAILABLE_BUFFERS)
        alignment = self._check_alignment(core, "query_available_buffers", alignment)
        return core.area.count_free(size, alignment)

    def end_configuration(self) -> None:
        """Map the buffer area; the client's ``get_configuration`` returns now."""
        core = self._enter(ServerCall.END_CONFIGURATION)
        core.area.materialize()  # VDMemoryError leaves the set configurable
        config = core.config
        features = config.features | core.media_features
        if config.features & Features.REQUEST_COMPLETE and core.honour_complete:
            features |= Features.COMPLETE_ENABLED
        core.final_config = config.replace(
            features=features,
            block_size=core.block_size,
            max_io_depth=MAX_IO_DEPTH,
            max_transfer_size=core.max_transfer_size,
            buffer_area_size=core.max_transfer_size * MAX_IO_DEPTH * config.device_count,
        )
        core.event(SetEvent.CONFIGURED)

    def _check_alignment(self, core: SetCore, what: str, alignment: int) -> int:
        if alignment == 0:
            return core.alignment
        if (
            not isinstance(alignment, int)
            or not is_power_of_two(alignment)
            or (alignment > ALIGNMENT_MAX)
        ):
            raise self._error(
                VDInvalidError,
                f"{what}: alignment={alignment!r} is not a power of two up to 64 KiB",
            )
        return max(alignment, core.alignment)

    # --- devices -------------------------------------------------------------------

    def open_device(self, name: str) -> ServerVirtualDevice:
        core = self._enter(ServerCall.OPEN_DEVICE)
        if not isinstance(name, str) or not name or "\\" in name:
            raise VDInvalidError(f"open_device: bad device name {name!r}", set_name=core.name)
        device = core.open_device(name, lambda d: d.server_opened, core.server_state.name)
        device.server_opened = True
        core.check_active()
        return ServerVirtualDevice(self, device)

    async def wait_active(self, timeout: float | None = None) -> None:
        """Return once both sides opened every device (a convenience beyond the spec)."""
        core = self._require_open("wait_active")

        def ready() -> bool | NotReady:
            self._check_live(core, "wait_active")
            if core.server_state in (ServerState.ACTIVE, ServerState.NORMALLY_TERMINATED):
                return True
            return NOT_READY

        await core.wait_for(core.notifier, ready, timeout, "wait_active")

    async def watch(self) -> None:
        """Run the set's server-timeout watchdog until the set aborts (then return) or
        this object closes it (then ``VDProtocolError``); cancel it to stop sooner.

        In-process, every wait on the set runs the watchdog, and the engine waits on
        its commands. A transport serving an engine in another process has no such
        waiter on this side, so it runs this: the watchdog then fires on time even
        when no pump is waiting either."""
        core = self._require_open("watch")

        def ready() -> bool | NotReady:
            if core.aborted:
                return True
            self._check_live(core, "watch")
            return NOT_READY

        await core.wait_for(core.notifier, ready, None, "watch")

    # --- buffers -------------------------------------------------------------------

    async def allocate_buffer(self, size: int, alignment: int = 0) -> memoryview:
        """A writable view of ``size`` bytes from the buffer area; waits for a free slot."""
        core = self._enter(ServerCall.ALLOCATE_BUFFER)
        alignment = self._check_alignment(core, "allocate_buffer", alignment)
        if not isinstance(size, int) or size <= 0:
            raise self._error(VDInvalidError, f"allocate_buffer: size={size!r} must be positive")
        if not core.area.could_fit(size, alignment):
            raise self._error(
                VDMemoryError,
                f"allocate_buffer: no buffer of {size} bytes aligned to {alignment} was "
                f"requested (the area has {core.area.slot_count} buffers)",
            )

        def ready() -> memoryview | NotReady:
            self._check_live(core, "allocate_buffer")
            slot = core.area.take(size, alignment)
            if slot is None:
                return NOT_READY
            view = slot.data(0, size)
            slot.views.append(view)
            return view

        return await core.wait_for(core.buffers_notifier, ready, None, "allocate_buffer")

    def free_buffer(self, buffer: memoryview) -> None:
        core = self._enter(ServerCall.FREE_BUFFER)
        if core.aborted:
            return  # decision 5: nothing to do; close() releases everything
        slot = self._slot_of(core, buffer, "free_buffer")
        if slot.pending:
            raise self._error(
                VDInvalidError, "free_buffer: an outstanding command still uses this buffer"
            )
        core.area.give_back(slot)
        core.buffers_notifier.notify_all()

    def is_shared_buffer(self, buffer: object) -> bool:
        if self._core is None or not isinstance(buffer, memoryview):
            return False
        return self._core.area.locate(buffer) is not None

    def segment_files(self) -> list[SegmentFile]:
        """The buffer area's segments (memfd, length), in order; ``[]`` before
        ``end_configuration``. The fds stay open (owned by the set) until the set is
        released; another process maps them ``MAP_SHARED`` at offset 0."""
        return self._require_open("segment_files").area.segment_files()

    def buffer_position(self, buffer: memoryview) -> tuple[int, int]:
        """(segment index, offset in that segment) of the first byte of ``buffer``, a
        buffer allocated from this set (``VDInvalidError`` otherwise)."""
        core = self._require_open("buffer_position")
        found = core.area.locate(buffer) if isinstance(buffer, memoryview) else None
        if found is None:
            raise self._error(VDInvalidError, "buffer_position: not a buffer of this set")
        return core.area.position(*found)

    def buffer_start(self, segment: int, offset: int) -> tuple[int, int] | None:
        """The (segment, offset) where the buffer holding byte ``offset`` of segment
        ``segment`` begins (what ``buffer_position`` gave for it when it was
        allocated); ``None`` when no buffer of the area holds that byte."""
        found = self._require_open("buffer_start").area.slot_at(segment, offset)
        if found is None:
            return None
        return segment, offset - found[1]

    def _slot_of(self, core: SetCore, buffer: object, what: str) -> Slot:
        found = core.area.locate(buffer) if isinstance(buffer, memoryview) else None
        if found is None or not found[0].in_use:
            raise self._error(VDInvalidError, f"{what}: not a buffer allocated from this set")
        return found[0]

    # --- abort and close -----------------------------------------------------------

    def signal_abort(
        self, *, cause: SetAbortCause = SetAbortCause.SERVER, reason: str | None = None
    ) -> None:
        """Abort the set at once; idempotent. ``cause`` and ``reason`` let a transport
        that serves a server in another process record why (its death, a protocol
        violation); the default is the server's own abort."""
        core = self._enter(ServerCall.SIGNAL_ABORT)
        core.abort(cause, reason if reason is not None else "the server signalled abort")

    def add_state_listener(self, listener: Callable[[ServerState], None]) -> None:
        """Call ``listener(state)`` with this side's state after every event of the set
        (configured, activated, terminated, aborted: also those the client or the
        watchdog causes), synchronously, until this object closes the set. On an abort
        it runs before the outstanding commands complete. Like a command's done
        callback it must be quick, must not call into the set, and must not raise."""
        core = self._require_open("add_state_listener")

        def call() -> None:
            listener(core.server_state)

        self._listeners.append(call)
        core.listeners.append(call)

    def close(self) -> None:
        """Release the set (decision 4 of api.md).

        After an abort, or once every device was closed with ``close_device``, this
        returns ``None``; otherwise it aborts the set, releases everything, then raises
        ``VDProtocolError``.
        """
        core = self._enter(ServerCall.CLOSE)
        premature = not core.aborted and core.server_state is not ServerState.NORMALLY_TERMINATED
        if premature:
            core.abort(
                SetAbortCause.SERVER, "the server closed the set before every device was closed"
            )
        for slot in core.area.in_use():
            slot.release_views()
        core.server_closed = True
        core.server_state = ServerState.DNE
        for call in self._listeners:
            core.listeners.remove(call)
        self._listeners.clear()
        self._core = None
        core.maybe_release_area()
        if premature:
            raise VDProtocolError(
                "close: devices were still open; the set was aborted and released",
                set_name=core.name,
                state="ACTIVE",
            )

    # --- conveniences ----------------------------------------------------------------

    async def __aenter__(self) -> ServerVirtualDeviceSet:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """On an exception: abort the set (if not already); then close it if this
        object still holds it (``close``'s own error when devices are still open)."""
        if self._core is None:
            return
        if exc is not None and not self._core.aborted:
            self.signal_abort()
        self.close()


class ServerVirtualDevice(DeviceFacade[ServerVirtualDeviceSet]):
    """One device as the engine sees it: send commands, close it at the end."""

    def send_command(
        self,
        code: int,
        size: int = 0,
        position: int = 0,
        buffer: memoryview | None = None,
    ) -> PendingCommand:
        """Queue a command; await the returned object for its ``CommandResult``."""
        device = self.core
        core = device.core
        try:
            code = CommandCode(code)
        except ValueError:
            raise self._invalid(f"send_command: unknown command code {code!r}") from None
        if (
            not isinstance(size, int)
            or not isinstance(position, int)
            or not (-_I64 <= position < _I64 and -(1 << 31) <= size < (1 << 32))
        ):
            raise self._invalid(
                f"send_command: size={size!r} and position={position!r} out of range"
            )
        slot: Slot | None = None
        offset = 0
        if code in BUFFER_COMMANDS:
            found = core.area.locate(buffer) if isinstance(buffer, memoryview) else None
            if found is None or not found[0].in_use:
                raise self._invalid(
                    f"send_command: {code.name} needs a buffer allocated from this set"
                )
            slot, offset = found
            assert buffer is not None
            if not 0 <= size <= buffer.nbytes:
                raise self._invalid(
                    f"send_command: size={size} exceeds the buffer's {buffer.nbytes} bytes"
                )
        refusal = self._refusal(core, code)
        if refusal is not None:
            # A refused command never reaches the client, so it holds no buffer.
            pending = PendingCommand(core, device, code, size, position)
            pending.finish(CommandResult(refusal))
            return pending
        pending = PendingCommand(core, device, code, size, position, slot, offset)
        if slot is not None:
            slot.pending += 1
        device.queue.append(pending)
        core.command_added()
        device.notifier.notify_all()
        return pending

    def _refusal(self, core: SetCore, code: CommandCode) -> Completion | None:
        if self._owner._core is not core:
            return Completion.INVALID_HANDLE
        core.check_watchdog()
        outcome = server_transition(core.server_state, ServerCall.SEND_COMMAND)
        if outcome.result is HResult.ABORT:
            return Completion.OPERATION_ABORTED
        if not outcome.ok:
            return Completion.INVALID_HANDLE
        refusal = device_refusal(self.core.state, code is CommandCode.CLEAR_ERROR)
        if refusal is not None:
            return refusal
        if self.core.held() >= MAX_QUEUED:
            return Completion.NO_SYSTEM_RESOURCES
        return None

    def close_device(self) -> None:
        """End this device's stream: the client gets every earlier command, then a close."""
        device = self.core
        self._own_set("close_device")
        core = self._owner._enter(ServerCall.CLOSE_DEVICE, device)
        if core.aborted:
            return  # decision 5
        if device.state is DeviceState.CLOSED:
            raise VDClosedError(
                "close_device: the device is already closed",
                set_name=core.name,
                device=self.name,
                state=core.server_state.name,
            )
        device.state = device_after_close(device.state)
        device.queue.append(CLOSE_MARKER)
        device.notifier.notify_all()
        if all(d.state is DeviceState.CLOSED for d in core.devices):
            core.server_state = ServerState.NORMALLY_TERMINATED
            core.notifier.notify_all()
